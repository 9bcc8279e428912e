"""Hard quadruplet mining for a block of anchors against a pool that contains them.

The same function serves one process (the block is the whole batch, ``offset=0``) and N processes (the block
is this worker's local batch inside the all-gathered pool, at ``offset = rank * local_batch``). Mining only
picks indices: it runs without gradient, and the loss recomputes the scores of the mined pairs with gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

#: ``similarity(rows, pool) -> (len(rows), len(pool))`` scores, higher = more similar.
Similarity = Callable[[Tensor, Tensor], Tensor]

MODES = ("anchor", "batch")


@dataclass(frozen=True)
class Quadruplets:
    """Mined quadruplets ``(i, j, k, l)`` as indices into the pool.

    ``i`` anchor, ``j`` its hardest positive, ``k`` i's hardest negative, ``l`` j's hardest negative.
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
        return Quadruplets(
            self.i[index], self.j[index], self.k[index], self.l[index], self.score[index], self.skipped
        )


@torch.no_grad()
def mine_quadruplets(
    similarity: Similarity,
    pool: Tensor,
    labels: Tensor,
    offset: int = 0,
    count: int | None = None,
    mode: str = "anchor",
) -> Quadruplets:
    """Mine hard quadruplets for anchors ``pool[offset : offset + count]`` against the whole ``pool``.

    ``mode="anchor"`` returns one quadruplet per anchor that has a positive and a negative; ``mode="batch"``
    returns the single quadruplet of the paper: the block's hardest positive pair (lowest ``S_ij``; first
    in row-major order on ties), with each member's hardest negative. A sample is never its own positive.
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

    device = pool.device
    anchors = torch.arange(offset, offset + count, device=device)
    scores = similarity(pool[offset : offset + count], pool)  # (count, n_pool)
    neg_mask = labels[anchors, None] != labels[None, :]
    pos_mask = ~neg_mask
    pos_mask[torch.arange(count, device=device), anchors] = False

    valid = pos_mask.any(1) & neg_mask.any(1)
    skipped = (~valid).sum()
    pos_scores = scores.masked_fill(~pos_mask, float("inf"))
    pos_score, j = pos_scores.min(1)
    k = scores.masked_fill(~neg_mask, float("-inf")).argmax(1)

    keep = valid.nonzero().squeeze(1)
    if mode == "batch" and keep.numel() > 0:
        keep = keep[pos_score[keep].argmin()].reshape(1)
    i, j, k, pos_score = anchors[keep], j[keep], k[keep], pos_score[keep]

    # l: j's hardest negative. j shares i's label, so j's negatives are i's; reuse the block's score rows
    # where j is itself an anchor of the block, and score the other j's (on other workers) once each.
    j_scores = scores.new_empty(len(j), n_pool)
    inside = (j >= offset) & (j < offset + count)
    j_scores[inside] = scores[j[inside] - offset]
    if not bool(inside.all()):
        outside_ids, inverse = torch.unique(j[~inside], return_inverse=True)
        j_scores[~inside] = similarity(pool[outside_ids], pool)[inverse]
    l = j_scores.masked_fill(~neg_mask[keep], float("-inf")).argmax(1)
    return Quadruplets(i, j, k, l, pos_score, skipped)
