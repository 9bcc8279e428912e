"""Naive references the fast code is checked against: one pair at a time, straight from docs/method.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distpddm.pddm import PDDM


def naive_pddm_score(unit: PDDM, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """S(a, b) for one pair, in float64, with the concatenation [u'; v'] the paper writes."""
    p = {k: v.double() for k, v in unit.state_dict().items()}
    a, b = a.double(), b.double()
    u = (a - b).abs()
    v = (a + b) / 2
    u1 = F.normalize(torch.relu(p["wu.weight"] @ u + p["wu.bias"]), dim=0)
    v1 = F.normalize(torch.relu(p["wv.weight"] @ v + p["wv.bias"]), dim=0)
    c = torch.relu(p["wc.weight"] @ torch.cat([u1, v1]) + p["wc.bias"])
    return (p["ws.weight"] @ c + p["ws.bias"]).squeeze()


def naive_pddm_matrix(unit: PDDM, rows: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.stack([naive_pddm_score(unit, r, p) for p in pool]) for r in rows])


def brute_force_mine(scores, labels, offset: int, count: int, mode: str):
    """Reference miner over a full (pool x pool) score matrix, with Python loops.

    Returns (quadruplets as a list of (i, j, k, l), skipped count). Ties go to the lowest index.
    """
    n = len(labels)
    labels = [int(x) for x in labels]
    cands, skipped = [], 0
    for i in range(offset, offset + count):
        pos = [p for p in range(n) if labels[p] == labels[i] and p != i]
        neg = [q for q in range(n) if labels[q] != labels[i]]
        if not pos or not neg:
            skipped += 1
            continue
        j = min(pos, key=lambda p: (float(scores[i, p]), p))
        k = max(neg, key=lambda q: (float(scores[i, q]), -q))
        l = max(neg, key=lambda q: (float(scores[j, q]), -q))
        cands.append((float(scores[i, j]), (i, j, k, l)))
    if mode == "batch" and cands:
        cands = [min(cands, key=lambda c: c[0])]
    return [c[1] for c in cands], skipped
