"""The vocabulary the loss parts share: the :class:`Pool` a worker mines against, the per-element
:class:`Terms` its loss computes for its own anchors (which a reducer averages over the global batch), and
:class:`PoolLoss`, the base of every loss the wrappers take.

Splitting a loss this way (anchors here, normalisation over every worker) is what makes it exact across
devices: see :class:`distpddm.wrappers.CrossDevice` and ``docs/method.md``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .dist import is_distributed


@dataclass(frozen=True)
class Pool:
    """Embeddings and labels to mine against -- every worker's batch in rank order, then any memory rows --
    and which of them are this worker's anchors (``features[offset : offset + count]``).

    ``world`` and ``group`` name the process group the pool was gathered over (1 and None for a pool one
    process holds): parts that need a collective (a global count, the batch's single hardest pair) use them.
    """

    features: Tensor
    labels: Tensor
    offset: int = 0
    count: int | None = None
    world: int = 1
    group: object = None

    def __post_init__(self):
        n = self.features.shape[0]
        if self.features.dim() != 2:
            raise ValueError(f"pool features must be (n, dim), got shape {tuple(self.features.shape)}")
        if self.labels.reshape(-1).shape[0] != n:
            raise ValueError(f"{self.labels.numel()} labels for a pool of {n} embeddings")
        if self.count is None:
            object.__setattr__(self, "count", n - self.offset)
        if self.offset < 0 or self.count < 0 or self.offset + self.count > n:
            raise ValueError(f"anchor block [{self.offset}, {self.offset + self.count}) does not lie in a pool of {n}")

    @property
    def anchors(self) -> slice:
        return slice(self.offset, self.offset + self.count)

    def with_rows(self, features: Tensor, labels: Tensor) -> Pool:
        """This pool with more rows after its own (a memory): anchors keep their offsets."""
        return Pool(
            torch.cat([self.features, features.to(self.features)]),
            torch.cat([self.labels.reshape(-1), labels.reshape(-1).to(self.labels.device)]),
            self.offset,
            self.count,
            self.world,
            self.group,
        )


@dataclass
class Terms:
    """What a loss computed for this worker's anchors, before reduction.

    ``losses[name]`` holds one value per element (quadruplet, pair, triplet or anchor: ``kinds[name]`` says
    which) with gradient; the loss is ``sum(weights[name] * reduce(losses[name]))``, the reduction taken over
    the global batch. ``stats`` are 0-d tensors without gradient, for logging.
    """

    losses: dict[str, Tensor]
    weights: dict[str, float] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)

    def weight(self, name: str) -> float:
        return self.weights.get(name, 1.0)


def as_pool(embeddings: Tensor, labels: Tensor, dim: int | None = None) -> Pool:
    """One process's batch as its own pool, in fp32 at least (bf16 scores break argmin / argmax ties
    differently, and the hinges' margins are small)."""
    if embeddings.dim() != 2 or (dim is not None and embeddings.shape[1] != dim):
        want = f"(n, {dim})" if dim is not None else "(n, dim)"
        raise ValueError(f"expected embeddings of shape {want}, got {tuple(embeddings.shape)}")
    wide = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
    return Pool(wide, labels.reshape(-1).to(embeddings.device))


@torch.no_grad()
def spread(features: Tensor) -> Tensor:
    """The mean distance of L2-normalised rows to their centroid: ~0 when the embedding has collapsed."""
    unit = torch.nn.functional.normalize(features.detach(), dim=1)
    return (unit - unit.mean(0)).norm(dim=1).mean() if len(unit) else unit.new_zeros(())


class PoolLoss(nn.Module):
    """A loss as parts: :meth:`terms` for a pool's anchors and a ``reducer``; called on a batch, the batch is
    its own pool. Inside ``torch.distributed`` that mines each worker's batch alone: wrap the loss in
    :class:`~distpddm.wrappers.CrossDevice` to mine against the global batch."""

    dim: int | None = None

    def terms(self, pool: Pool) -> Terms:
        raise NotImplementedError

    def forward(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss on this batch alone, and what it saw (the terms' stats)."""
        if is_distributed():
            warnings.warn(
                f"{type(self).__name__} called directly inside torch.distributed mines this worker's batch alone; "
                "wrap it in distpddm.CrossDevice to mine against every worker's batch",
                stacklevel=2,
            )
        with torch.autocast(embeddings.device.type, enabled=False):
            pool = as_pool(embeddings, labels, self.dim)
            terms = self.terms(pool)
            return self.reducer(terms, pool), terms.stats
