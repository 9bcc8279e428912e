"""Signs that a run has stopped learning, said while it runs: a collapsed PDDM metric (``docs/collapse.md``).

A collapsed metric scores the mined positive and negative pairs alike, so every metric hinge sits at its
margin: ``E_m = 2 alpha`` with every hinge active. From random initialisation a run can sit there for
hundreds of steps (or for good) while its loss looks steady; :class:`CollapseWatch` marks each logged step
(``metric_collapsed`` in ``metrics.jsonl``) and warns once the state has lasted ``patience`` steps.
"""

from __future__ import annotations

import logging

log = logging.getLogger("distpddm.train")


def metric_collapsed(stats: dict, alpha: float, tolerance: float = 0.02) -> bool:
    """Whether one step's stats show a collapsed metric: positive and negative scores within ``tolerance x
    alpha`` of each other, every metric hinge active, and E_m within that of ``2 alpha``."""
    needed = ("pos_score", "neg_score", "metric_loss", "active_metric")
    if alpha <= 0 or not all(k in stats for k in needed):
        return False
    gap = abs(float(stats["pos_score"]) - float(stats["neg_score"]))
    at_margin = abs(float(stats["metric_loss"]) - 2 * alpha) <= 2 * tolerance * alpha
    return gap <= tolerance * alpha and at_margin and float(stats["active_metric"]) >= 0.99


class CollapseWatch:
    """Per logged step: whether the metric is collapsed, and one warning once it has been for ``patience``
    steps in a row (a healthy start from random weights can look collapsed for a few steps)."""

    def __init__(self, alpha: float, patience: int):
        self.alpha, self.patience = alpha, patience
        self.since: int | None = None
        self.warned = False

    def __call__(self, step: int, stats: dict) -> dict:
        collapsed = metric_collapsed(stats, self.alpha)
        if not collapsed:
            if self.warned:
                log.warning("step %d: the metric separates positive from negative pairs again", step)
            self.since, self.warned = None, False
            return {"metric_collapsed": 0.0}
        if self.since is None:
            self.since = step
        if not self.warned and step - self.since >= self.patience:
            self.warned = True
            log.warning(
                "step %d: the metric has been collapsed since step %d: mined positive and negative pairs score "
                "alike (%.4f / %.4f) and every metric hinge sits at 2 x alpha = %.3f; the embedding learns only "
                "from E_e. See docs/collapse.md (smaller margins, metric_grad: false, a pretrained backbone)",
                step, self.since, float(stats["pos_score"]), float(stats["neg_score"]), 2 * self.alpha,
            )  # fmt: skip
        return {"metric_collapsed": 1.0}
