"""Hard quadruplet mining for a block of anchors against a pool that contains them.

The same function serves one process (the block is the whole batch, ``offset=0``) and N processes (the block
is this worker's local batch inside the all-gathered pool, at ``offset = rank * local_batch``). Mining only
picks indices: it runs without gradient, and the loss recomputes the scores of the mined pairs with gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .config import MINING_MODES as MODES
from .config import POSITIVES


class Scorer(Protocol):
    """What the miner needs of a metric (PDDM, Euclidean, Mahalanobis): higher score = more similar."""

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        """Scores of aligned pairs, ``(..., dim) x (..., dim) -> (...)``."""

    def pairwise(self, rows: Tensor, pool: Tensor, chunk: int | None = None) -> Tensor:
        """Scores of every row against every pool member, ``(R, P)``."""


@dataclass(frozen=True)
class Quadruplets:
    """Mined quadruplets ``(i, j, k, l)`` as indices into the pool.

    ``i`` anchor, ``j`` its hardest positive, ``k`` i's hardest negative, ``l`` j's hardest negative (or
    whichever positives / negatives :func:`mine_quadruplets`' options pick).
    ``score`` holds the miner's ``S_ij`` (no gradient); ``skipped`` counts anchors of the block that had no
    positive or no negative in the pool (a 0-d tensor, so reading it does not force a device sync).
    """

    i: Tensor
    j: Tensor
    k: Tensor
    l: Tensor
    score: Tensor
    skipped: Tensor

    def __len__(self) -> int:
        return int(self.i.shape[0])

    def take(self, index: Tensor) -> Quadruplets:
        """The quadruplets at ``index`` (a long or bool tensor); ``skipped`` is kept."""
        return Quadruplets(self.i[index], self.j[index], self.k[index], self.l[index], self.score[index], self.skipped)


def candidate_scores(
    scorer: Scorer, rows: Tensor, pool: Tensor, neg_mask: Tensor, candidates: int, chunk: int | None = None
) -> Tensor:
    """Scores of every positive of each row and of its ``candidates`` negatives nearest by dot product.

    The other negatives get ``-inf``: they cannot be the hardest. Positives are few (K - 1 per anchor in a
    P x K batch) and all scored, so the hardest positive is exact; the hardest negative is exact whenever
    it lies among the dot-product candidates (``bench/mining.py`` reports how often).
    """
    dots = (rows @ pool.T).masked_fill_(~neg_mask, float("-inf"))
    top = dots.topk(min(candidates, pool.shape[0]), dim=1).indices
    wanted = ~neg_mask
    wanted.scatter_(1, top, True)  # rows with fewer negatives than candidates re-mark some positives: harmless
    r, c = wanted.nonzero(as_tuple=True)
    out = torch.full_like(dots, float("-inf"))
    step = chunk or 65536
    out[r, c] = torch.cat([scorer(rows[r[s : s + step]], pool[c[s : s + step]]) for s in range(0, len(r), step)])
    return out


def check_quadruplets_per_anchor(
    mode: str, positives: str, negatives: int, semihard: bool = False, candidates: int | None = None
) -> None:
    """``ValueError`` unless ``positives`` / ``negatives`` are valid and, in batch mode, the paper's one."""
    if positives not in POSITIVES:
        raise ValueError(f"positives must be one of {POSITIVES}, got {positives!r}")
    if isinstance(negatives, bool) or not isinstance(negatives, int) or negatives < 1:
        raise ValueError(f"negatives must be an int >= 1, got {negatives!r}")
    if mode == "batch" and (positives != "hardest" or negatives != 1):
        raise ValueError(
            "mode='batch' mines the paper's single quadruplet per batch: positives / negatives need mode='anchor'"
        )
    if semihard and (mode != "anchor" or negatives != 1):
        raise ValueError(
            "semihard picks one negative of i and of j per positive pair: it needs mode='anchor', negatives=1"
        )
    if semihard and candidates is not None:
        raise ValueError(
            "semihard needs every negative scored (candidates=None): the dot-nearest candidates are the hardest "
            "negatives, so the semi-hard one would mostly be missing from them"
        )


def _semihard(rows: Tensor, pos_score: Tensor) -> Tensor:
    """Each row's most similar negative that is still less similar than the pair's positive (``-inf`` off the
    negatives); rows without one fall back to their *least* similar negative, as the reference semi-hard
    triplet loss (TensorFlow Addons') does: no pair then pushes on a negative it scores above its positive."""
    easiest = rows.masked_fill(rows == float("-inf"), float("inf")).argmin(1)
    score, col = rows.masked_fill(rows >= pos_score[:, None], float("-inf")).max(1)
    return torch.where(torch.isfinite(score), col, easiest)


def _hardest(scores: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The ``n`` highest scores of each row and their columns (argmax for one: first column on ties)."""
    if n == 1:
        idx = scores.argmax(1, keepdim=True)
        return scores.gather(1, idx), idx
    return scores.topk(n, dim=1)


@torch.no_grad()
def mine_quadruplets(
    scorer: Scorer,
    pool: Tensor,
    labels: Tensor,
    offset: int = 0,
    count: int | None = None,
    mode: str = "anchor",
    *,
    chunk: int | None = None,
    candidates: int | None = None,
    positives: str = "hardest",
    negatives: int = 1,
    semihard: bool = False,
) -> Quadruplets:
    """Mine hard quadruplets for anchors ``pool[offset : offset + count]`` against the whole ``pool``.

    ``mode="anchor"`` returns one quadruplet per anchor that has a positive and a negative; ``mode="batch"``
    returns the single quadruplet of the paper: the block's hardest positive pair (lowest ``S_ij``; first
    in row-major order on ties), with each member's hardest negative. A sample is never its own positive.
    ``candidates=c`` scores only all positives and the ``c`` nearest negatives by dot product (cheaper,
    approximate; see :func:`candidate_scores`); ``None`` scores every pair (exact).

    More than one quadruplet per anchor (``mode="anchor"`` only; the paper leaves the count open):
    ``positives="all"`` takes every positive ``j`` of the anchor, not only the hardest, and ``negatives=n``
    pairs the ``n`` hardest negatives of ``i`` with the ``n`` hardest of ``j``, rank by rank. Each
    ``(i, j)`` then yields up to ``n`` quadruplets; ``score`` is that pair's ``S_ij``.

    ``semihard=True`` (one negative each, exact scoring) takes, for each pair, i's and j's most similar
    negative that is still *less* similar than the positive (``S_ik < S_ij``, ``S_jl < S_ij``; FaceNet's
    semi-hard choice, in the mining metric), or, where there is none, the least similar negative (as
    TensorFlow Addons' semi-hard triplet loss falls back): negatives the metric cannot yet tell from the
    positive (near-duplicate classes) no longer get the whole push.
    """
    if mode not in MODES:
        raise ValueError(f"mining mode must be one of {MODES}, got {mode!r}")
    if pool.dim() != 2:
        raise ValueError(f"pool must be (n, dim), got shape {tuple(pool.shape)}")
    labels = labels.reshape(-1)
    n_pool = pool.shape[0]
    if labels.shape[0] != n_pool:
        raise ValueError(f"labels has {labels.shape[0]} entries for a pool of {n_pool}")
    count = n_pool - offset if count is None else count
    if offset < 0 or count < 0 or offset + count > n_pool:
        raise ValueError(f"anchor block [{offset}, {offset + count}) does not lie inside a pool of {n_pool}")

    if candidates is not None and candidates < 1:
        raise ValueError(f"candidates must be >= 1 or None, got {candidates}")
    check_quadruplets_per_anchor(mode, positives, negatives, semihard, candidates)

    def similarity(rows: Tensor, row_neg_mask: Tensor) -> Tensor:
        if candidates is None:
            return scorer.pairwise(rows, pool, chunk=chunk)
        return candidate_scores(scorer, rows, pool, row_neg_mask, candidates, chunk)

    device = pool.device
    anchors = torch.arange(offset, offset + count, device=device)
    neg_mask = labels[anchors, None] != labels[None, :]
    scores = similarity(pool[offset : offset + count], neg_mask)  # (count, n_pool)
    pos_mask = ~neg_mask
    pos_mask[torch.arange(count, device=device), anchors] = False

    valid = pos_mask.any(1) & neg_mask.any(1)
    skipped = (~valid).sum()
    pos_scores = scores.masked_fill(~pos_mask, float("inf"))
    neg_scores = scores.masked_fill(~neg_mask, float("-inf"))
    if positives == "hardest":
        pos_score, j = pos_scores.min(1)
        keep = valid.nonzero().squeeze(1)
        if mode == "batch" and keep.numel() > 0:
            keep = keep[pos_score[keep].argmin()].reshape(1)
        a, j, pos_score = keep, j[keep], pos_score[keep]  # a: the anchor's row in the block
    else:
        a, j = (pos_mask & valid[:, None]).nonzero(as_tuple=True)
        pos_score = scores[a, j]
    if semihard:
        return _mine_semihard(similarity, neg_scores, labels, pool, anchors, a, j, pos_score, offset, skipped)
    n_neg = min(negatives, n_pool)
    block_k_score, block_k = _hardest(neg_scores, n_neg)  # every block row's hardest negatives, once
    k_score, k = block_k_score[a], block_k[a]  # (pairs, n_neg)

    # l: j's hardest negatives. j shares i's label, so j's negatives are i's: where j is itself an anchor of
    # the block they were found above; the other j's (on other workers) are scored once each.
    l_score, l = k_score.new_empty(k_score.shape), k.new_empty(k.shape)
    inside = (j >= offset) & (j < offset + count)
    l_score[inside], l[inside] = block_k_score[j[inside] - offset], block_k[j[inside] - offset]
    if not bool(inside.all()):
        outside_ids, inverse = torch.unique(j[~inside], return_inverse=True)
        outside_neg = labels[outside_ids, None] != labels[None, :]
        outside = similarity(pool[outside_ids], outside_neg).masked_fill_(~outside_neg, float("-inf"))
        out_score, out_l = _hardest(outside, n_neg)
        l_score[~inside], l[~inside] = out_score[inverse], out_l[inverse]
    if n_neg == 1:  # one quadruplet per pair: argmax ties resolve as before
        i = anchors[a]
        return Quadruplets(i, j, k[:, 0], l[:, 0], pos_score, skipped)
    # Rank r pairs i's r-th and j's r-th hardest negative; ranks beyond an anchor's negatives are dropped.
    real = torch.isfinite(k_score) & torch.isfinite(l_score)
    rows = real.nonzero(as_tuple=True)[0]
    i, j, pos_score = anchors[a][rows], j[rows], pos_score[rows]
    return Quadruplets(i, j, k[real], l[real], pos_score, skipped)


def _mine_semihard(similarity, neg_scores, labels, pool, anchors, a, j, pos_score, offset, skipped) -> Quadruplets:
    """The semi-hard negatives of i and of j for each mined pair (see :func:`mine_quadruplets`)."""
    k = _semihard(neg_scores[a], pos_score)
    # j's scores against the pool: its row of the block where j is an anchor here, else scored once per j
    count = neg_scores.shape[0]
    inside = (j >= offset) & (j < offset + count)
    j_rows = neg_scores.new_empty(len(j), neg_scores.shape[1])
    j_rows[inside] = neg_scores[j[inside] - offset]
    if not bool(inside.all()):
        outside_ids, inverse = torch.unique(j[~inside], return_inverse=True)
        outside_neg = labels[outside_ids, None] != labels[None, :]
        j_rows[~inside] = similarity(pool[outside_ids], outside_neg).masked_fill_(~outside_neg, float("-inf"))[inverse]
    l = _semihard(j_rows, pos_score)
    return Quadruplets(anchors[a], j, k, l, pos_score, skipped)
