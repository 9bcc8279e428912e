"""A collapsed metric is said while the run runs: marked on every logged step, warned about once it lasts."""

from __future__ import annotations

import logging

import torch

from distpddm import PDDMLoss
from distpddm.train.health import CollapseWatch, metric_collapsed

ALPHA = 0.1


def _stats(pos, neg, metric_loss, active=1.0):
    return {"pos_score": pos, "neg_score": neg, "metric_loss": metric_loss, "active_metric": active}


def test_a_collapsed_metric_is_told_from_a_separating_one():
    # the hidden drawings' run (issue 23): 0.0502 / 0.0504 at step 100, E_m exactly 2 alpha, every hinge active
    assert metric_collapsed(_stats(0.0502, 0.0504, 0.200), ALPHA)
    assert not metric_collapsed(_stats(0.427, 0.325, 0.05, 0.4), ALPHA)  # step 740: separating
    assert not metric_collapsed(_stats(0.05, 0.05, 0.2, active=0.8), ALPHA)  # some hinges hold
    assert not metric_collapsed(_stats(0.05, 0.06, 0.2), ALPHA)  # a gap of alpha / 10
    assert not metric_collapsed({"loss": 0.3}, ALPHA)  # a loss without a learned metric's stats


def test_the_watch_warns_once_the_collapse_lasts_and_says_when_it_ends(caplog):
    watch = CollapseWatch(ALPHA, patience=100)
    marks = []
    with caplog.at_level(logging.WARNING, logger="distpddm.train"):
        for step in range(20, 481, 20):  # collapsed from step 20 to 460
            marks.append(watch(step, _stats(0.13, 0.13, 0.2))["metric_collapsed"])
        marks.append(watch(500, _stats(0.43, 0.33, 0.05, 0.5))["metric_collapsed"])
    assert marks == [1.0] * 24 + [0.0]
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2
    assert warned[0].startswith("step 120: the metric has been collapsed since step 20")
    assert "every metric hinge sits at 2 x alpha = 0.200" in warned[0]
    assert warned[1] == "step 500: the metric separates positive from negative pairs again"


def test_a_collapsed_embedding_trips_it_through_the_loss_itself():
    """Every embedding equal: PDDMLoss's own stats are the collapsed state the watch looks for."""
    torch.manual_seed(0)
    loss = PDDMLoss(8, alpha=ALPHA, beta=0.1)
    same = torch.ones(16, 8)
    _, stats = loss(same, torch.arange(4).repeat_interleave(4))
    assert metric_collapsed({k: float(v) for k, v in stats.items()}, ALPHA)
    _, stats = loss(torch.randn(16, 8), torch.arange(4).repeat_interleave(4))
    assert not metric_collapsed({k: float(v) for k, v in stats.items()}, ALPHA)
