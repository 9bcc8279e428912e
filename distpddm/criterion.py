"""The criterion a run config names, built from parts by registry: ``loss:`` (PDDM, or a
pytorch-metric-learning loss), ``miner:`` and ``reducer:`` (each ``{name: ..., <its arguments>}``), and
``memory:`` (a cross-batch memory around the loss). The trainer wraps the result in
:class:`~distpddm.wrappers.CrossDevice`.

Each part checks its own arguments (its constructor); :func:`check_criterion` builds the parts the way a
run would and turns what they refuse into the config's one-line errors, so nothing is checked twice.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from typing import TYPE_CHECKING

from torch import nn

from .coerce import coerce, type_name
from .errors import ConfigError
from .loss import PAPER_SETTING, PDDMLoss
from .miners import MINERS, QuadrupletMiner
from .reducers import REDUCERS
from .wrappers import CrossBatchMemory

if TYPE_CHECKING:
    from .config import PartConfig, RunConfig

#: loss name -> pytorch-metric-learning class name ("pddm" is distpddm's own); each is exact across workers
#: (distpddm.pml.EXACT, tests/test_distributed.py)
PML_LOSSES = {
    "multi_similarity": "MultiSimilarityLoss",
    "contrastive": "ContrastiveLoss",
    "triplet_margin": "TripletMarginLoss",
    "ntxent": "NTXentLoss",
}
#: deterministic miners only: across workers every one must pick the same tuples
PML_MINERS = {"multi_similarity": "MultiSimilarityMiner", "batch_hard": "BatchHardMiner"}
#: keys of the loss section before the redesign, and where they went
MOVED = {
    "mode": "miner.name (hard, or batch_hardest for the paper's one quadruplet per batch)",
    "positives": "miner.positives",
    "negatives": "miner.negatives",
    "candidates": "miner.candidates",
    "chunk": "miner.chunk",
    "semihard": "miner.name: semihard",
    "reduction": "reducer.name",
    "memory": "memory.size",
    "memory_warmup": "memory.warmup",
}


#: section -> (distpddm's parts by name, pytorch-metric-learning's by name, its module)
REGISTRIES = {
    "loss": ({"pddm": PDDMLoss}, PML_LOSSES, "losses"),
    "miner": (MINERS, PML_MINERS, "miners"),
    "reducer": (REDUCERS, {}, "reducers"),
}


def part_class(section: str, name: str):
    """The class ``section.name`` names (pytorch-metric-learning's imported on demand)."""
    return _resolve(section, name, *REGISTRIES[section])


def _resolve(section: str, name: str, known: dict, pml: dict, kind: str):
    if name in known:
        return known[name]
    if name in pml:
        import importlib

        return getattr(importlib.import_module(f"pytorch_metric_learning.{kind}"), pml[name])
    choices = [*known, *pml]
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{section}.name {name!r} is not known{hint} (one of {', '.join(choices)})")


def _expected_types(cls) -> dict:
    """The types a constructor's arguments take: its annotations (distpddm's parts), else the type of each
    default (pytorch-metric-learning's, unannotated), a number standing for int or float."""
    if cls.__module__.startswith("distpddm"):
        return typing.get_type_hints(cls.__init__)
    out = {}
    for name, p in inspect.signature(cls).parameters.items():
        default = p.default
        if isinstance(default, bool):
            out[name] = bool
        elif isinstance(default, (int, float)):
            out[name] = float if isinstance(default, float) else int | float
        elif isinstance(default, str):
            out[name] = str
    return out


def _build(section: str, cls, args: dict, **given):
    """``cls(**given, **args)``, with ``args`` checked against the constructor's names and types first."""
    params = inspect.signature(cls).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = [n for n, p in params.items() if n not in given and p.kind is not inspect.Parameter.VAR_KEYWORD]
    hints = _expected_types(cls)
    kwargs = {}
    for key, value in args.items():
        if key not in params and not accepts_any or key in given:
            if section == "loss" and key in MOVED:
                raise ConfigError(f"loss.{key} is now {MOVED[key]} (docs/launching.md, the loss as config sections)")
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {section}.{close[0]}?" if close else f"; it takes {', '.join(names) or 'none'}"
            raise ConfigError(f"unknown key {section}.{key} for {cls.__name__}{hint}")
        if key in hints:
            ok, value = coerce(value, hints[key])
            if not ok:
                raise ConfigError(f"{section}.{key} must be {type_name(hints[key])}, got {args[key]!r}")
        kwargs[key] = value
    try:
        return cls(**given, **kwargs)
    except (ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"{section} ({cls.__name__}): {e}") from None


#: arguments the builder passes itself, never from the config
_GIVEN = {"dim", "miner", "reducer", "loss"}
#: the defaults that changed in 5b26fcf, as they were before: what checkpoints written before parts were
#: recorded resolved (no ``config_resolved`` in their state) ran with
LEGACY_DEFAULTS = {("loss", "pddm"): PAPER_SETTING, ("miner", "hard"): {"positives": "hardest"}}


def resolved(tree: dict, *, legacy: bool = False) -> dict:
    """A config tree (:meth:`RunConfig.to_dict`) with each part's unnamed scalar arguments at the defaults this
    version gives them (``legacy``: as before they changed, :data:`LEGACY_DEFAULTS`), and PDDM's implicit miner
    named: what a checkpoint records, so that a resume after a default changed is refused, not trained on
    silently. Unknown names are left for the config check."""
    out = dict(tree)
    if (out.get("loss") or {}).get("name") == "pddm" and out.get("miner") is None:
        out["miner"] = {"name": "hard"}  # PDDMLoss's own default miner
    for section in REGISTRIES:
        part = out.get(section)
        if not isinstance(part, dict) or not isinstance(part.get("name"), str):
            continue
        try:
            cls = part_class(section, part["name"])
        except ConfigError:
            continue
        defaults = {
            n: p.default
            for n, p in inspect.signature(cls).parameters.items()
            if n not in _GIVEN and (p.default is None or isinstance(p.default, (bool, int, float, str)))
        }
        if legacy:
            defaults |= LEGACY_DEFAULTS.get((section, part["name"]), {})
        out[section] = {"name": part["name"], **defaults, **{k: v for k, v in part.items() if k != "name"}}
    return out


def build_miner(part: PartConfig | None):
    if part is None:
        return None
    return _build("miner", part_class("miner", part.name), part.args)


def build_reducer(part: PartConfig | None):
    if part is None:
        return None
    if part.name not in REDUCERS:
        raise ConfigError(f"reducer.name {part.name!r} is not known (one of {', '.join(REDUCERS)})")
    return _build("reducer", REDUCERS[part.name], part.args)


def build_loss(cfg: RunConfig) -> nn.Module:
    """The pool loss of ``cfg`` (its miner and reducer in it), inside a cross-batch memory when one is set."""
    part = cfg.loss
    miner, reducer = build_miner(cfg.miner), build_reducer(cfg.reducer)
    if part.name == "pddm":
        if miner is not None and not isinstance(miner, QuadrupletMiner):
            raise ConfigError(
                f"miner {cfg.miner.name!r} does not mine quadruplets: loss pddm takes miner.name {' | '.join(MINERS)}"
            )
        loss = _build("loss", PDDMLoss, part.args, dim=cfg.model.embed_dim, miner=miner, reducer=reducer)
    else:
        from .pml import PMLLoss

        if isinstance(miner, QuadrupletMiner):
            raise ConfigError(
                f"miner {cfg.miner.name!r} mines quadruplets for loss pddm; loss {part.name!r} takes a "
                f"pytorch-metric-learning miner ({' | '.join(PML_MINERS)}) or none"
            )
        pml_loss = _build("loss", part_class("loss", part.name), part.args)
        try:
            loss = PMLLoss(pml_loss, miner, reducer)
        except ValueError as e:
            raise ConfigError(f"loss {part.name!r}: {e}") from None
    if cfg.memory.size:
        loss = _build("memory", CrossBatchMemory, {"size": cfg.memory.size, "warmup": cfg.memory.warmup}, loss=loss)
    return loss


def inner_loss(criterion: nn.Module) -> nn.Module:
    """The loss inside any wrappers (what holds the learned metric, e.g. for the export)."""
    while hasattr(criterion, "loss") and isinstance(criterion.loss, nn.Module) and hasattr(criterion.loss, "terms"):
        criterion = criterion.loss
    return criterion


def check_criterion(cfg: RunConfig) -> list[str]:
    """The config's errors in the loss parts (none: a list that is empty): the parts are built, and the loss
    is run once on a small random P x K batch, so that what only a call would reveal fails here, not at a
    worker's first step."""
    import torch

    try:
        loss = build_loss(cfg)
    except ConfigError as e:
        return [str(e)]
    dim = cfg.model.embed_dim
    labels = torch.arange(4).repeat_interleave(2)
    embeddings = torch.nn.functional.normalize(torch.randn(len(labels), dim, generator=torch.Generator()), dim=1)
    try:
        value, _ = loss(embeddings.requires_grad_(), labels)
        value.backward()
    except Exception as e:  # any failure of a configured part on a plain batch is the config's
        return [f"loss {cfg.loss.name!r} fails on a test batch ({type(e).__name__}: {e})".splitlines()[0]]
    return []
