"""The learned metric at test time: re-ranking Euclidean neighbours with the PDDM unit, and the similarity
distributions of positive and negative pairs under the learned metric and under plain Euclidean distance.

Retrieval itself stays Euclidean (fast, exact, indexable); the PDDM unit, a small MLP on embedding pairs,
re-orders only each query's top-N, so its cost is N pair scores per query (reported beside the figures).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .dist import device_time
from .retrieval import recall_from_neighbours, search


@torch.no_grad()
def _scores(scorer: nn.Module, a: np.ndarray, b: np.ndarray, device: torch.device, block: int = 65536) -> np.ndarray:
    """``scorer(a_n, b_n)`` for aligned rows, in blocks (higher = more similar)."""
    out = np.empty(len(a), np.float32)
    for s in range(0, len(a), block):
        ta = torch.from_numpy(np.ascontiguousarray(a[s : s + block])).to(device)
        tb = torch.from_numpy(np.ascontiguousarray(b[s : s + block])).to(device)
        out[s : s + block] = scorer(ta, tb).float().reshape(-1).cpu().numpy()
    return out


def rerank(
    embeddings: np.ndarray,
    labels: np.ndarray,
    scorer: nn.Module,
    *,
    top_n: int = 8,
    ks: Sequence[int] = (1, 2, 4, 8),
    device: torch.device | None = None,
    query_block: int = 4096,
) -> dict[str, float]:
    """Recall@K of every query's ``top_n`` Euclidean neighbours re-ordered by ``scorer``, beside the plain
    Euclidean Recall@K of the same lists (K <= top_n), with the scoring cost per query.

    Queries are every sample whose class has another member (as in :func:`~distpddm.retrieval.retrieval_metrics`)."""
    device = device or torch.device("cpu")
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels)
    n = len(x)
    top_n = min(top_n, n - 1)
    ks = sorted(k for k in set(ks) if k <= top_n)
    _, sizes = np.unique(labels, return_inverse=True)
    counts = np.bincount(sizes)
    queries = np.flatnonzero(counts[sizes] > 1)
    _, nn_idx = search(x[queries], x, top_n, query_ids=queries)
    scorer = scorer.to(device).eval()
    reranked = np.empty_like(nn_idx)
    t0 = time.perf_counter()
    for s in range(0, len(queries), query_block):
        rows, cand = queries[s : s + query_block], nn_idx[s : s + query_block]
        scores = _scores(scorer, np.repeat(x[rows], top_n, axis=0), x[cand.reshape(-1)], device).reshape(cand.shape)
        order = np.argsort(-scores, axis=1, kind="stable")  # ties keep the Euclidean order
        reranked[s : s + query_block] = np.take_along_axis(cand, order, axis=1)
    seconds = device_time(device) - t0
    plain = recall_from_neighbours(labels[nn_idx], labels[queries], ks)
    better = recall_from_neighbours(labels[reranked], labels[queries], ks)
    out = {f"rerank@{top_n}/recall@{k}": float(better[f"recall@{k}"]) for k in ks}
    out |= {f"rerank@{top_n}/euclidean_recall@{k}": float(plain[f"recall@{k}"]) for k in ks}
    out[f"rerank@{top_n}/ms_per_query"] = 1e3 * seconds / max(1, len(queries))
    out[f"rerank@{top_n}/queries"] = float(len(queries))
    return out


def pair_similarities(
    embeddings: np.ndarray,
    labels: np.ndarray,
    scorer: nn.Module | None,
    *,
    pairs: int = 20000,
    seed: int = 0,
    device: torch.device | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Similarities of up to ``pairs`` random positive and as many random negative pairs (seeded), under the
    learned metric (when given) and under plain Euclidean distance (as its negative, so higher = more
    similar for both): ``{metric: {"positive": ..., "negative": ...}}``."""
    device = device or torch.device("cpu")
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    ends = np.searchsorted(sorted_labels, sorted_labels, side="right")
    has_pos = np.flatnonzero(ends - starts > 1)
    pos_a = rng.choice(has_pos, size=pairs) if len(has_pos) else has_pos  # sorted positions with a positive
    size = ends[pos_a] - starts[pos_a]
    pos_b = starts[pos_a] + (pos_a - starts[pos_a] + rng.integers(1, np.maximum(2, size))) % np.maximum(1, size)
    pa, pb = order[pos_a], order[pos_b]
    na = rng.integers(0, len(x), size=pairs * 2)
    nb = rng.integers(0, len(x), size=pairs * 2)
    keep = labels[na] != labels[nb]
    na, nb = na[keep][:pairs], nb[keep][:pairs]
    out = {
        "negative Euclidean distance": {
            "positive": -np.linalg.norm(x[pa] - x[pb], axis=1),
            "negative": -np.linalg.norm(x[na] - x[nb], axis=1),
        }
    }
    if scorer is not None:
        scorer = scorer.to(device).eval()
        name = "PDDM score" if type(scorer).__name__ == "PDDM" else f"{type(scorer).__name__} score"
        out[name] = {
            "positive": _scores(scorer, x[pa], x[pb], device),
            "negative": _scores(scorer, x[na], x[nb], device),
        }
    return out
