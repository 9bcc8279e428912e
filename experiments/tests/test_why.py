"""experiments/protocol/why.py: the training phases, the hardest pairs and Recall@1 by class size, on cases whose
answer is known."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "protocol"))

import why  # noqa: E402


def _unit(degrees):
    a = np.radians(np.asarray(degrees, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


class Dot(torch.nn.Module):
    def forward(self, a, b):
        return (a * b).sum(1)


class Flipped(torch.nn.Module):
    def forward(self, a, b):
        return -(a * b).sum(1)


def test_hardest_pairs_are_the_farthest_positive_and_the_nearest_negative():
    # class 0 at 0, 10, 60 degrees; class 1 at 30 and 200: query 0's hardest positive is 60, nearest negative 30
    emb = _unit([0, 10, 60, 30, 200])
    labels = np.array([0, 0, 0, 1, 1])
    out = why.hardest_pairs(emb * 3.0, labels, Dot(), beta=0.1)  # unnormalised rows: normalised first
    d = lambda a, b: 2 * np.sin(np.radians(abs(a - b)) / 2)  # noqa: E731  chord length on the unit circle
    pos = [d(0, 60), d(10, 60), d(60, 0), d(30, 200), d(200, 30)]
    neg = [d(0, 30), d(10, 30), d(60, 30), d(30, 10), d(200, 60)]
    assert out["queries"] == 5
    assert out["hardest_positive_distance"] == pytest.approx(np.mean(pos), abs=1e-5)
    assert out["hardest_negative_distance"] == pytest.approx(np.mean(neg), abs=1e-5)
    gaps = np.array(neg) - np.array(pos)
    assert out["positive_nearer"] == pytest.approx(np.mean(gaps > 0))
    assert out["gap_above_beta"] == pytest.approx(np.mean(gaps > 0.1))
    # a dot-product "metric" agrees with Euclidean order on unit rows; its negation never does
    assert out["metric_positive_higher"] == pytest.approx(np.mean(gaps > 0))
    flipped = why.hardest_pairs(emb, labels, Flipped())
    assert flipped["metric_positive_higher"] == pytest.approx(np.mean(gaps < 0))
    assert "gap_above_beta" not in flipped


def test_training_phases_average_what_the_loss_logged_and_count_collapsed_steps():
    rows = [{"step": 0, "val_recall@1": 0.3}]
    for step in range(10, 101, 10):
        collapsed = step <= 50
        rows.append({
            "step": step, "loss": 0.2, "spread": 0.1 if collapsed else 0.5, "active_embedding": 1.0,
            "active_metric": 1.0, "pos_score": 0.05, "neg_score": 0.05 if collapsed else 0.01,
            "metric_loss": 0.2 if collapsed else 0.1, "metric_collapsed": float(collapsed), "quadruplets": 64.0,
        })  # fmt: skip
    phases = why.training(rows, alpha=0.1)
    assert [p["steps"] for p in phases] == ["1-25", "26-50", "51-75", "76-100"]
    assert [p["collapsed_steps"] for p in phases] == [2, 3, 0, 0]
    assert phases[0]["metric_loss_over_2alpha"] == pytest.approx(1.0)
    assert phases[3]["metric_loss_over_2alpha"] == pytest.approx(0.5)
    assert phases[0]["spread"] == pytest.approx(0.1) and phases[2]["spread"] == pytest.approx(0.5)
    assert phases[0]["mined"] == pytest.approx(64.0)
    ms_rows = [{"step": s, "loss": 1.0, "spread": 0.7, "tuples": 50.0 + s, "pair_active": 0.25} for s in (1, 2)]
    ms = why.training(ms_rows, None)
    assert ms[-1]["active"] == pytest.approx(0.25) and "pos_score" not in ms[-1] and ms[-1]["mined"] == 52.0
    assert why.training([{"step": 0, "val_recall@1": 0.3}], None) == []


def test_recall_by_class_size_bins_the_queries_by_their_class():
    # a class of 3 images together (hits); a class of 25, one of them alone beside a third class (a miss)
    small = _unit([0, 1, 2])
    big = np.concatenate([_unit(np.linspace(100, 110, 24)), _unit([300])])
    intruders = _unit([301, 302, 303, 304, 305])
    emb = np.concatenate([small, big, intruders])
    labels = np.array([0] * 3 + [1] * 25 + [2] * 5)
    out = why.recall_by_class_size(emb, labels, edges=(10, 20))
    assert out["<10"]["queries"] == 8 and out[">=20"]["queries"] == 25 and out["10-19"]["queries"] == 0
    assert out["10-19"]["recall@1"] is None
    assert out[">=20"]["recall@1"] == pytest.approx(24 / 25)
