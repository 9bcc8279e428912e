"""Quadruplet miners: which ``(i, j, k, l)`` a PDDM loss trains on -- a positive pair ``(i, j)``, a negative
``k`` of ``i`` and a negative ``l`` of ``j`` -- chosen by the loss's own similarity (higher = more similar).

Every miner has one interface, ``miner(scorer, pool) -> Quadruplets``: quadruplets for the pool's anchors
(this worker's block) against the whole pool, picked without gradient; the loss rescores the picked pairs with
gradient. The policies (``docs/method.md``): :class:`HardQuadrupletMiner` (the hardest positive, or every
positive, each with the ``n`` hardest negatives; exact, or among ``candidates`` dot-nearest negatives),
:class:`SemiHardQuadrupletMiner` and :class:`BatchHardestQuadrupletMiner` (the paper's one per batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from .dist import all_gather_same, rank_and_world
from .pool import Pool

POSITIVES = ("hardest", "all")


class Scorer(Protocol):
    """What a miner needs of a metric (PDDM, Euclidean, Mahalanobis)."""

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        """Scores of aligned pairs, ``(..., dim) x (..., dim) -> (...)``."""

    def pairwise(self, rows: Tensor, pool: Tensor, chunk: int | None = None) -> Tensor:
        """Scores of every row against every pool member, ``(R, P)``."""


@dataclass(frozen=True)
class Quadruplets:
    """Mined quadruplets ``(i, j, k, l)`` as indices into the pool, ``score`` the miner's ``S_ij`` (no
    gradient), and ``skipped`` the anchors of the block with no positive or no negative in the pool (a 0-d
    tensor, so reading it does not force a device sync)."""

    i: Tensor
    j: Tensor
    k: Tensor
    l: Tensor
    score: Tensor
    skipped: Tensor

    def __len__(self) -> int:
        return int(self.i.shape[0])


def candidate_scores(
    scorer: Scorer, rows: Tensor, pool: Tensor, neg_mask: Tensor, candidates: int, chunk: int | None = None
) -> Tensor:
    """Scores of every positive of each row and of its ``candidates`` negatives nearest by dot product; the
    other negatives get ``-inf`` (they cannot be the hardest). Positives are few and all scored, so the hardest
    positive is exact; the hardest negative is exact whenever it lies among the candidates (``bench/mining.py``
    reports how often)."""
    dots = (rows @ pool.T).masked_fill_(~neg_mask, float("-inf"))
    top = dots.topk(min(candidates, pool.shape[0]), dim=1).indices
    wanted = ~neg_mask
    wanted.scatter_(1, top, True)  # rows with fewer negatives than candidates re-mark some positives: harmless
    r, c = wanted.nonzero(as_tuple=True)
    out = torch.full_like(dots, float("-inf"))
    step = chunk or 65536
    out[r, c] = torch.cat([scorer(rows[r[s : s + step]], pool[c[s : s + step]]) for s in range(0, len(r), step)])
    return out


def _hardest(scores: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """The ``n`` highest scores of each row and their columns (argmax for one: first column on ties)."""
    if n == 1:
        idx = scores.argmax(1, keepdim=True)
        return scores.gather(1, idx), idx
    return scores.topk(n, dim=1)


def _semihard(rows: Tensor, pos_score: Tensor) -> Tensor:
    """Each row's most similar negative still less similar than its pair's positive (rows are ``-inf`` off the
    negatives); rows without one fall back to their *least* similar negative, as TensorFlow Addons' semi-hard
    triplet loss does: no pair then pushes on a negative it scores above its positive."""
    easiest = rows.masked_fill(rows == float("-inf"), float("inf")).argmin(1)
    score, col = rows.masked_fill(rows >= pos_score[:, None], float("-inf")).max(1)
    return torch.where(torch.isfinite(score), col, easiest)


@dataclass(frozen=True)
class Block:
    """The anchors' scores against the pool, and what the miners derive from them."""

    pool: Tensor  # (n, dim), detached
    labels: Tensor  # (n,)
    offset: int
    anchors: Tensor  # pool indices of the block's rows
    neg: Tensor  # (count, n) negative scores, -inf elsewhere
    pos: Tensor  # (count, n) positive scores (never the anchor itself), +inf elsewhere
    pos_mask: Tensor  # (count, n)
    valid: Tensor  # (count,) anchors with a positive and a negative
    skipped: Tensor
    score_rows: object  # (pool indices, their negative masks) -> scores: for j's outside the block

    def negative_rows(self, ids: Tensor) -> Tensor:
        """The negative-score rows of pool members ``ids`` (each a row of the block, or scored once here)."""
        count = self.neg.shape[0]
        inside = (ids >= self.offset) & (ids < self.offset + count)
        out = self.neg.new_empty(len(ids), self.neg.shape[1])
        out[inside] = self.neg[ids[inside] - self.offset]
        if not bool(inside.all()):
            outside_ids, inverse = torch.unique(ids[~inside], return_inverse=True)
            mask = self.labels[outside_ids, None] != self.labels[None, :]
            out[~inside] = self.score_rows(self.pool[outside_ids], mask).masked_fill_(~mask, float("-inf"))[inverse]
        return out


class QuadrupletMiner:
    """Base: scores the block's anchors against the pool (exactly, chunked by ``chunk`` pairs), then
    :meth:`select` picks the quadruplets. A sample is never its own positive."""

    def __init__(self, *, chunk: int | None = None):
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"chunk must be an int >= 1 or None, got {chunk!r}")
        self.chunk = chunk

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if v is not None)
        return f"{type(self).__name__}({args})"

    def score(self, scorer: Scorer, rows: Tensor, pool: Tensor, neg_mask: Tensor) -> Tensor:
        return scorer.pairwise(rows, pool, chunk=self.chunk)

    @torch.no_grad()
    def __call__(self, scorer: Scorer, pool: Pool) -> Quadruplets:
        feats, labels = pool.features.detach(), pool.labels.reshape(-1)
        anchors = torch.arange(pool.offset, pool.offset + pool.count, device=feats.device)
        neg_mask = labels[anchors, None] != labels[None, :]
        scores = self.score(scorer, feats[pool.anchors], feats, neg_mask)  # (count, n)
        pos_mask = ~neg_mask
        pos_mask[torch.arange(pool.count, device=feats.device), anchors] = False
        valid = pos_mask.any(1) & neg_mask.any(1)
        block = Block(
            feats,
            labels,
            pool.offset,
            anchors,
            neg=scores.masked_fill(~neg_mask, float("-inf")),
            pos=scores.masked_fill(~pos_mask, float("inf")),
            pos_mask=pos_mask,
            valid=valid,
            skipped=(~valid).sum(),
            score_rows=lambda rows, mask: self.score(scorer, rows, feats, mask),
        )
        return self.select(block, pool)

    def select(self, block: Block, pool: Pool) -> Quadruplets:
        raise NotImplementedError

    @staticmethod
    def positive_pairs(block: Block, positives: str) -> tuple[Tensor, Tensor, Tensor]:
        """(block rows, their positives j, S_ij): each valid anchor's hardest positive, or every one."""
        if positives == "hardest":
            pos_score, j = block.pos.min(1)
            keep = block.valid.nonzero().squeeze(1)
            return keep, j[keep], pos_score[keep]
        a, j = (block.pos_mask & block.valid[:, None]).nonzero(as_tuple=True)
        return a, j, block.pos[a, j]


def _check_positives(positives: str) -> None:
    if positives not in POSITIVES:
        raise ValueError(f"positives must be one of {POSITIVES}, got {positives!r}")


class HardQuadrupletMiner(QuadrupletMiner):
    """Per anchor every positive (``positives="all"``, the default: chosen on validation classes, docs/results.md)
    or its hardest (``"hardest"``, the paper's anchor-wise form), each pair with the ``negatives`` hardest
    negatives of ``i`` and of ``j``, rank by rank (ranks beyond the negatives there are dropped).
    ``candidates=c`` scores only all positives and the ``c`` negatives nearest by dot product: cheaper,
    approximate (:func:`candidate_scores`)."""

    def __init__(
        self, positives: str = "all", negatives: int = 1, candidates: int | None = None, chunk: int | None = None
    ):
        super().__init__(chunk=chunk)
        _check_positives(positives)
        if isinstance(negatives, bool) or not isinstance(negatives, int) or negatives < 1:
            raise ValueError(f"negatives must be an int >= 1, got {negatives!r}")
        if candidates is not None and (isinstance(candidates, bool) or not isinstance(candidates, int)):
            raise ValueError(f"candidates must be an int >= 1 or None, got {candidates!r}")
        if candidates is not None and candidates < max(1, negatives):
            raise ValueError(f"candidates must be >= negatives ({negatives}) and >= 1, or None; got {candidates}")
        self.positives, self.negatives, self.candidates = positives, negatives, candidates

    def score(self, scorer: Scorer, rows: Tensor, pool: Tensor, neg_mask: Tensor) -> Tensor:
        if self.candidates is None:
            return super().score(scorer, rows, pool, neg_mask)
        return candidate_scores(scorer, rows, pool, neg_mask, self.candidates, self.chunk)

    def select(self, block: Block, pool: Pool) -> Quadruplets:
        a, j, pos_score = self.positive_pairs(block, self.positives)
        n = min(self.negatives, block.neg.shape[1])
        block_score, block_k = _hardest(block.neg, n)  # each block row's hardest negatives, once
        k_score, k = block_score[a], block_k[a]
        # j shares i's label, so j's negatives are i's: its row of the block when j is an anchor here, else
        # scored once per distinct j.
        l_score, l = _hardest_of_rows(block, j, n, block_score, block_k)
        i = block.anchors[a]
        if n == 1:
            return Quadruplets(i, j, k[:, 0], l[:, 0], pos_score, block.skipped)
        real = torch.isfinite(k_score) & torch.isfinite(l_score)
        rows = real.nonzero(as_tuple=True)[0]
        return Quadruplets(i[rows], j[rows], k[real], l[real], pos_score[rows], block.skipped)


def _hardest_of_rows(block: Block, ids: Tensor, n: int, block_score: Tensor, block_k: Tensor):
    """The ``n`` hardest negatives of pool members ``ids``: the block's (already found) where they are anchors
    here, found once per distinct member elsewhere."""
    count = block.neg.shape[0]
    inside = (ids >= block.offset) & (ids < block.offset + count)
    score, col = block_score.new_empty(len(ids), n), block_k.new_empty(len(ids), n)
    score[inside], col[inside] = block_score[ids[inside] - block.offset], block_k[ids[inside] - block.offset]
    if not bool(inside.all()):
        outside_ids, inverse = torch.unique(ids[~inside], return_inverse=True)
        out_score, out_col = _hardest(block.negative_rows(outside_ids), n)
        score[~inside], col[~inside] = out_score[inverse], out_col[inverse]
    return score, col


class SemiHardQuadrupletMiner(QuadrupletMiner):
    """Per positive pair (its hardest, or every one), i's and j's most similar negative still *less* similar
    than the positive (``S_ik < S_ij``; FaceNet's semi-hard choice, in the mining metric), else the least
    similar negative: negatives the metric cannot yet tell from the positive no longer get the whole push.
    Every negative is scored (no candidates: the dot-nearest ones are the hardest, not the semi-hard)."""

    def __init__(self, positives: str = "all", chunk: int | None = None):
        super().__init__(chunk=chunk)
        _check_positives(positives)
        self.positives = positives

    def select(self, block: Block, pool: Pool) -> Quadruplets:
        a, j, pos_score = self.positive_pairs(block, self.positives)
        k = _semihard(block.neg[a], pos_score)
        l = _semihard(block.negative_rows(j), pos_score)
        return Quadruplets(block.anchors[a], j, k, l, pos_score, block.skipped)


class BatchHardestQuadrupletMiner(HardQuadrupletMiner):
    """The paper's form: one quadruplet per global batch, the hardest positive pair of all anchors (lowest
    ``S_ij``; first in row-major order, then first rank, on ties) with each member's hardest negative. Across
    workers the pair is chosen with one all-gather of each worker's best; the worker owning its anchor keeps it.
    ``candidates`` as :class:`HardQuadrupletMiner`'s."""

    def __init__(self, candidates: int | None = None, chunk: int | None = None):
        super().__init__("hardest", 1, candidates, chunk)

    def select(self, block: Block, pool: Pool) -> Quadruplets:
        a, j, pos_score = self.positive_pairs(block, "hardest")
        if len(a):
            best = pos_score.argmin().reshape(1)
            a, j, pos_score = a[best], j[best], pos_score[best]
        if pool.world > 1:
            mine = pos_score.min().reshape(1) if len(a) else block.neg.new_full((1,), float("inf"))
            winner = int(all_gather_same(mine.float(), pool.group).reshape(-1).argmin())
            if winner != rank_and_world(pool.group)[0]:
                a, j, pos_score = a[:0], j[:0], pos_score[:0]
        k = block.neg[a].argmax(1) if len(a) else a
        l = block.negative_rows(j).argmax(1) if len(a) else j
        return Quadruplets(block.anchors[a], j, k, l, pos_score, block.skipped)


MINERS = {
    "hard": HardQuadrupletMiner,
    "semihard": SemiHardQuadrupletMiner,
    "batch_hardest": BatchHardestQuadrupletMiner,
}
