"""Global metrics used as PDDM's baselines: Euclidean and a learned Mahalanobis distance.

Each exposes the same two calls as :class:`distpddm.pddm.PDDM` -- aligned scores ``forward(a, b)`` and
``pairwise(rows, pool)`` -- with *similarity* = minus the squared distance, so the miner and the loss treat
every metric alike (higher = more similar).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def pairwise_squared_distances(rows: Tensor, pool: Tensor) -> Tensor:
    """``||r - p||^2`` for every row and pool member, via one matmul (clamped at 0 against rounding)."""
    sq = (rows * rows).sum(1, keepdim=True) + (pool * pool).sum(1)[None, :] - 2.0 * rows @ pool.T
    return sq.clamp_min_(0.0) if not sq.requires_grad else sq.clamp_min(0.0)


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """``||a_n - b_n||^2`` of aligned pairs."""
    return (a - b).pow(2).sum(-1)


class Euclidean(nn.Module):
    """Parameter-free similarity ``-||a - b||^2``."""

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return -squared_distances(a, b)

    def pairwise(self, rows: Tensor, pool: Tensor, chunk: int | None = None) -> Tensor:
        return -pairwise_squared_distances(rows, pool)


class Mahalanobis(nn.Module):
    """Learned similarity ``-(a - b)^T M (a - b)`` with ``M = L^T L``, PSD by construction.

    ``L`` starts as the identity, so training starts from the Euclidean metric.
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim < 1:
            raise ValueError(f"Mahalanobis dim must be >= 1, got {dim}")
        self.L = nn.Parameter(torch.eye(dim))

    @property
    def matrix(self) -> Tensor:
        """The PSD matrix ``M = L^T L``."""
        return self.L.T @ self.L

    def transform(self, x: Tensor) -> Tensor:
        return x @ self.L.T

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return -squared_distances(self.transform(a), self.transform(b))

    def pairwise(self, rows: Tensor, pool: Tensor, chunk: int | None = None) -> Tensor:
        return -pairwise_squared_distances(self.transform(rows), self.transform(pool))
