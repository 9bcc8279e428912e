"""All-gather of a local batch with gradient, so each worker can mine against the global pool.

Gradients of features that other workers' losses used travel back through the gather's backward
(``torch.distributed.nn.functional.all_gather``: reduce-scatter on NCCL, all-to-all + sum on gloo).
With no process group, or a world of one, everything here is the identity.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor


def is_distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world(group=None) -> tuple[int, int]:
    if is_distributed(group):
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


@dataclass(frozen=True)
class GlobalBatch:
    """The concatenation of every worker's batch, in rank order, and where this worker's part starts."""

    features: Tensor
    labels: Tensor
    offset: int
    local_size: int


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    pad = [0, 0] * (x.dim() - 1) + [0, rows - x.shape[0]]
    return F.pad(x, pad)


def gather_batch(features: Tensor, labels: Tensor, group=None) -> GlobalBatch:
    """Gather features (with gradient) and labels (without) from every worker.

    Local batches may differ in size between workers (they are padded for the collective and trimmed).
    """
    n = features.shape[0]
    if labels.shape[0] != n:
        raise ValueError(f"{labels.shape[0]} labels for {n} embeddings")
    if not is_distributed(group):
        return GlobalBatch(features, labels, 0, n)
    rank, world = rank_and_world(group)
    size = torch.tensor([n], dtype=torch.long, device=features.device)
    sizes_t = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes_t, size, group=group)
    sizes = [int(s) for s in sizes_t]
    rows = max(sizes)
    with warnings.catch_warnings():
        # Deprecated in favour of a private module (_functional_collectives); this public call is kept.
        warnings.simplefilter("ignore", FutureWarning)
        parts = dist_fn.all_gather(_pad_rows(features, rows), group=group)
    label_parts = [torch.empty(rows, dtype=labels.dtype, device=labels.device) for _ in range(world)]
    dist.all_gather(label_parts, _pad_rows(labels, rows), group=group)
    pool = torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])
    pool_labels = torch.cat([p[:s] for p, s in zip(label_parts, sizes, strict=True)])
    return GlobalBatch(pool, pool_labels, sum(sizes[:rank]), n)


def all_reduce_sum(x: Tensor, group=None) -> Tensor:
    """Sum of a (no-gradient) tensor over workers; the tensor itself when not distributed."""
    if not is_distributed(group):
        return x
    x = x.detach().clone()
    dist.all_reduce(x, group=group)
    return x


def all_gather_no_grad(x: Tensor, group=None) -> Tensor:
    """Stack of a same-shaped tensor from every worker, ``(world, *x.shape)``."""
    if not is_distributed(group):
        return x.detach()[None]
    _, world = rank_and_world(group)
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.detach().contiguous(), group=group)
    return torch.stack(out)
