"""Wrappers around any pool loss (:class:`~distpddm.loss.PDDMLoss`, :class:`~distpddm.pml.PMLLoss`): the
gather with gradient that makes it exact across workers (:class:`CrossDevice`), and a cross-batch memory
(:class:`CrossBatchMemory`).

A pool loss has ``terms(pool) -> Terms`` (per-element losses of the pool's anchors), a ``reducer``, and may
have ``set_step(step)``; both wrappers keep that shape, so they nest: ``CrossDevice(CrossBatchMemory(loss))``.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor, nn

from .dist import all_gather_rows, device_time, is_distributed, rank_and_world
from .pool import Pool, PoolLoss, Terms, as_pool


def _set_step(module: nn.Module, step: int) -> None:
    if hasattr(module, "set_step"):
        module.set_step(step)


class CrossDevice(nn.Module):
    """Gather every worker's batch with gradient, compute ``loss``'s terms for this worker's anchors against
    the global pool, and reduce them with global counts (:mod:`.reducers`).

    Each of N workers returns ``N * (its sum) / (global count)``: the average a data-parallel engine takes
    over workers then equals the one-process loss on the concatenated batch, and so do the gradients
    (those of rows other workers used travel back through the gather). With one process it is ``loss`` on
    the batch. Mining and the loss run in fp32 at least, whatever the caller's dtype or autocast.
    Set ``timed`` to have each call record its wall-clock split (device-synchronised) in ``timings``.
    """

    def __init__(self, loss: nn.Module, group=None):
        super().__init__()
        if not hasattr(loss, "terms") or not hasattr(loss, "reducer"):
            raise ValueError(f"CrossDevice wraps a pool loss (terms() and a reducer), got {type(loss).__name__}")
        self.loss, self.group = loss, group
        self.timed, self.timings = False, {}

    @property
    def reducer(self):
        return self.loss.reducer

    def set_step(self, step: int) -> None:
        _set_step(self.loss, step)

    def gather(self, embeddings: Tensor, labels: Tensor) -> Pool:
        """The global pool: every worker's rows in rank order (with gradient), this worker's as anchors."""
        local = as_pool(embeddings, labels)
        if not is_distributed(self.group):
            return local
        rank, world = rank_and_world(self.group)
        features, sizes = all_gather_rows(local.features, self.group, grad=True)
        pool_labels, _ = all_gather_rows(local.labels, self.group, sizes=sizes)
        return Pool(features, pool_labels, sum(sizes[:rank]), sizes[rank], world, self.group)

    def forward(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        device = embeddings.device
        with torch.autocast(device.type, enabled=False):
            t0 = time.perf_counter()
            pool = self.gather(embeddings, labels.reshape(-1).to(device))
            t1 = device_time(device) if self.timed else t0
            terms = self.loss.terms(pool)
            loss = self.loss.reducer(terms, pool)
            if self.timed:
                self.timings = {"gather": t1 - t0, "loss": device_time(device) - t1}
        return loss, terms.stats


class CrossBatchMemory(PoolLoss):
    """A FIFO of the last ``size`` pooled, detached embeddings and their labels (Wang et al., CVPR 2020), mined
    against -- positives and negatives, never anchors -- beside the pool after ``warmup`` steps; the gradient
    reaches only the current batch. Inside :class:`CrossDevice` every worker enqueues the gathered batch, so
    every worker holds the same memory. Not checkpointed: after a resume it refills."""

    def __init__(self, loss: nn.Module, size: int, warmup: int = 0):
        super().__init__()
        for name, value in (("size", size), ("warmup", warmup)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"memory {name} must be an int >= 0, got {value!r}")
        if size < 1:
            raise ValueError("memory size must be >= 1 (no memory: leave the wrapper out)")
        self.loss, self.size, self.warmup = loss, size, warmup
        self.step = 1  # the step of the next call (1-based)
        self.features: Tensor | None = None  # oldest first; not in the state dict
        self.labels: Tensor | None = None

    def extra_repr(self) -> str:
        return f"size={self.size}, warmup={self.warmup}"

    @property
    def reducer(self):
        return self.loss.reducer

    def set_step(self, step: int) -> None:
        self.step = int(step)
        _set_step(self.loss, step)

    def active(self) -> bool:
        """Whether this step mines against the memory (it fills from the first step on)."""
        return self.features is not None and self.step > self.warmup

    @torch.no_grad()
    def enqueue(self, features: Tensor, labels: Tensor) -> None:
        f, y = features.detach(), labels.detach().reshape(-1)
        if self.features is not None:
            f, y = torch.cat([self.features, f]), torch.cat([self.labels, y])
        self.features, self.labels = f[-self.size :].clone(), y[-self.size :].clone()

    def terms(self, pool: Pool) -> Terms:
        extended = pool.with_rows(self.features, self.labels) if self.active() else pool
        terms = self.loss.terms(extended)
        self.enqueue(pool.features, pool.labels)
        self.step += 1
        return terms
