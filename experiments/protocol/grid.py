"""The tuning grid: per method at most 8 configurations around its library defaults, the same budget for every
method, data set and regime (each x 1 seed on the validation classes; then 3 seeds of the chosen one).

A configuration replaces whole sections of the base config (``loss``, ``miner``, ``reducer``), so no argument
of one method leaks into another's: run.py passes them to ``distpddm train`` as ``loss={...}`` overrides.
Fixed before any run; a change to this file is a change of protocol (and shows in every record's commit).

Library defaults, the centre of each row:

* multi_similarity: pytorch-metric-learning's MultiSimilarityLoss(alpha=2, beta=50, base=0.5) with its
  MultiSimilarityMiner(epsilon=0.1).
* contrastive: ContrastiveLoss(pos_margin=0, neg_margin=1), no miner (every pair).
* triplet_margin: TripletMarginLoss(margin=0.05) with BatchHardMiner.
* pddm: distpddm.PDDMLoss's defaults when this grid was fixed, the paper's setting (alpha 0.5, beta 1.0, lam 0.5,
  metric_grad on) with HardQuadrupletMiner's (the hardest positive per anchor); the configurations the old study
  shipped (alpha .1, beta .1, every positive, metric_grad off) are points of this row, not its centre. The
  library's defaults have since become this row's choice on clip art (5b26fcf); the row stays as fixed.
"""

from __future__ import annotations

import json

METHODS = ("pddm", "multi_similarity", "contrastive", "triplet_margin")
MAX_CONFIGS = 8


def _ms(alpha=2.0, beta=50.0, base=0.5, epsilon=0.1) -> dict:
    return {
        "loss": {"name": "multi_similarity", "alpha": alpha, "beta": beta, "base": base},
        "miner": {"name": "multi_similarity", "epsilon": epsilon},
        "reducer": None,
    }


def _contrastive(pos=0.0, neg=1.0, miner=None) -> dict:
    return {
        "loss": {"name": "contrastive", "pos_margin": pos, "neg_margin": neg},
        "miner": miner,
        "reducer": None,
    }


def _triplet(margin=0.05, miner="batch_hard") -> dict:
    return {
        "loss": {"name": "triplet_margin", "margin": margin},
        "miner": {"name": miner} if miner else None,
        "reducer": None,
    }


def _pddm(alpha=0.5, beta=1.0, lam=0.5, metric_grad=True, positives="hardest") -> dict:
    return {
        "loss": {
            "name": "pddm",
            "metric": "pddm",
            "alpha": alpha,
            "beta": beta,
            "lam": lam,
            "metric_grad": metric_grad,
        },
        "miner": {"name": "hard", "positives": positives},
        "reducer": None,
    }


#: method -> config id -> the sections it sets; the first of each method is the library default.
GRID: dict[str, dict[str, dict]] = {
    "multi_similarity": {
        "default": _ms(),
        "alpha1": _ms(alpha=1.0),
        "alpha4": _ms(alpha=4.0),
        "beta25": _ms(beta=25.0),
        "beta100": _ms(beta=100.0),
        "base0.4": _ms(base=0.4),
        "base0.6": _ms(base=0.6),
        "eps0.2": _ms(epsilon=0.2),
    },
    "contrastive": {
        "default": _contrastive(),
        "neg0.5": _contrastive(neg=0.5),
        "neg0.8": _contrastive(neg=0.8),
        "neg1.2": _contrastive(neg=1.2),
        "neg1.4": _contrastive(neg=1.4),
        "pos0.1": _contrastive(pos=0.1),
        "pos0.25": _contrastive(pos=0.25),
        "batchhard": _contrastive(miner={"name": "batch_hard"}),
    },
    "triplet_margin": {
        "default": _triplet(),
        "m0.02": _triplet(margin=0.02),
        "m0.1": _triplet(margin=0.1),
        "m0.2": _triplet(margin=0.2),
        "m0.3": _triplet(margin=0.3),
        "all-m0.05": _triplet(miner=None),
        "all-m0.1": _triplet(margin=0.1, miner=None),
        "all-m0.2": _triplet(margin=0.2, miner=None),
    },
    "pddm": {
        "default": _pddm(),
        "allpos": _pddm(positives="all"),
        "nomg": _pddm(metric_grad=False),
        "allpos-nomg": _pddm(positives="all", metric_grad=False),
        "a0.1b0.1": _pddm(alpha=0.1, beta=0.1),
        "shipped": _pddm(alpha=0.1, beta=0.1, positives="all", metric_grad=False),
        "a0.25b0.5": _pddm(alpha=0.25, beta=0.5),
        "a0.25b0.5-allpos-nomg": _pddm(alpha=0.25, beta=0.5, positives="all", metric_grad=False),
    },
}


def config(method: str, config_id: str) -> dict:
    if method not in GRID:
        raise KeyError(f"unknown method {method!r} (one of {', '.join(GRID)})")
    if config_id not in GRID[method]:
        raise KeyError(f"unknown config {config_id!r} of {method} (one of {', '.join(GRID[method])})")
    return GRID[method][config_id]


def overrides(method: str, config_id: str) -> list[str]:
    """``distpddm train`` overrides of one configuration: whole sections, JSON (which YAML reads)."""
    return [f"{key}={json.dumps(value)}" for key, value in config(method, config_id).items()]


def check() -> None:
    """Every method within the budget, its first configuration its library default."""
    for method, configs in GRID.items():
        if not 1 <= len(configs) <= MAX_CONFIGS:
            raise ValueError(f"{method}: {len(configs)} configurations (budget {MAX_CONFIGS})")
        if next(iter(configs)) != "default":
            raise ValueError(f"{method}: the first configuration must be the library default")
        for cfg in configs.values():
            if cfg["loss"]["name"] != method:
                raise ValueError(f"{method}: a configuration names loss {cfg['loss']['name']!r}")


check()
