"""P classes x K images from a stream of labels, in bounded memory: the training sampling policy.

The batcher sees labels only (positions in a reader's stream, and their classes), so the same code plans
batches while images are read and, on resume, replays a stream from its labels alone without reading any
image (:mod:`.stream`).

Policy -- *proportional, capped at one group per class per batch*:

- Samples wait in a pool, per class, in arrival order. A class with K waiting samples is *ready*.
- Once 2P classes are ready (or the pool is full and P are), a batch takes P distinct ready classes, drawn
  without replacement with probability proportional to the number of whole groups of K each holds, and
  K of each one's waiting samples, drawn at random. Classes are therefore used in proportion to how often they
  occur, except that no class fills more than one of a batch's P slots. The K are drawn (not the K that came
  first) so that an image's positives can change between epochs: shards store a class in chunks, and whole
  chunks paired each image with the same others in every epoch. A draw varies them only where a class holds
  more than K when it is taken: with few classes (the clip art of ``experiments/protocol``: 2,250 distinct
  positive pairs in 200 batches before, 11,470 drawn), or with chunks of 2 K (the builder's default for
  K = 4). With many classes and chunks of K a ready class usually holds one chunk, taken whole as before;
  with 4 K the pool overflows and drops (docs/benchmarks.md, "Positive pairs").
- When the pool is full and fewer than P classes are ready, samples are dropped: first the surplus of
  over-represented ready classes (largest surplus first, down to a common level), then classes that have
  not reached K, oldest first. A class with fewer than K images in a reader's share is never used.
- At the end of a reader's epoch the remaining whole batches are taken and the rest is dropped.

Memory is at most ``buffer`` samples whatever the number of classes or their sizes; every drop is counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Names the policy in saved stream positions (``PKBatchDataset.layout``): a position saved under another one
#: replays other batches, so a resume across a change starts the next epoch instead ("drawn-k": 5b0bdec).
POLICY = "drawn-k"


@dataclass
class BatcherStats:
    read: int = 0  # samples pushed
    used: int = 0  # samples placed in batches
    dropped: int = 0  # samples evicted from the full pool or left over at the end

    def as_dict(self) -> dict[str, int]:
        return {"read": self.read, "used": self.used, "dropped": self.dropped}


class PKBatcher:
    """Online P x K batch former over ``(position, label)`` pushes. Deterministic given ``rng``.

    :meth:`push` returns the batches completed by that sample (lists of positions, K per class, classes
    contiguous); :attr:`dropped` collects positions evicted since the caller last cleared it, so a reader
    holding the samples' bytes can free them.
    """

    def __init__(self, P: int, K: int, buffer: int, rng: np.random.Generator):
        if P < 1 or K < 1:
            raise ValueError(f"P and K must be >= 1, got P={P}, K={K}")
        if buffer < P * K:
            raise ValueError(f"buffer ({buffer}) must hold at least one batch (P x K = {P * K})")
        self.P, self.K, self.buffer, self.rng = P, K, buffer, rng
        self.pending: dict[int, list[int]] = {}  # insertion order: the oldest waiting class first
        self.ready: set[int] = set()
        self.held = 0
        self.stats = BatcherStats()
        self.dropped: list[int] = []

    def push(self, position: int, label: int) -> list[list[int]]:
        self.stats.read += 1
        waiting = self.pending.get(label)
        if waiting is None:
            waiting = self.pending[label] = []
        waiting.append(position)
        self.held += 1
        if len(waiting) == self.K:
            self.ready.add(label)
        out = []
        while len(self.ready) >= 2 * self.P or (self.held >= self.buffer and len(self.ready) >= self.P):
            out.append(self._take())
        if self.held > self.buffer:  # full, and fewer than P classes ready
            self._evict()
        return out

    def finish(self) -> list[list[int]]:
        """The whole batches still in the pool; everything else is dropped. The batcher is then empty."""
        out = []
        while len(self.ready) >= self.P:
            out.append(self._take())
        for waiting in self.pending.values():
            self._drop(waiting)
        self.pending.clear()
        self.ready.clear()
        self.held = 0
        return out

    # ------------------------------------------------------------------------------------------- internals

    def _take(self) -> list[int]:
        ready = sorted(self.ready)
        groups = np.array([len(self.pending[c]) // self.K for c in ready], dtype=np.float64)
        chosen = self.rng.choice(len(ready), self.P, replace=False, p=groups / groups.sum())
        batch: list[int] = []
        for i in chosen:
            c = ready[i]
            waiting = self.pending[c]
            if len(waiting) == self.K:
                batch += waiting
                waiting.clear()
            else:  # K of the class's waiting samples at random: groups of K differ from epoch to epoch
                picked = np.sort(self.rng.choice(len(waiting), self.K, replace=False))
                batch += [waiting[j] for j in picked.tolist()]
                for j in reversed(picked.tolist()):
                    del waiting[j]
            if len(waiting) < self.K:
                self.ready.discard(c)
            if not waiting:
                del self.pending[c]
        self.held -= len(batch)
        self.stats.used += len(batch)
        return batch

    def _drop(self, positions: list[int]) -> None:
        self.dropped += positions
        self.stats.dropped += len(positions)
        self.held -= len(positions)

    def _evict(self) -> None:
        """Free a slice of the pool at once (an eviction scans the pool, so it should not run every push)."""
        excess = self.held - (self.buffer - max(self.K, self.buffer // 8))
        surplus = {c: len(self.pending[c]) - self.K for c in self.ready if len(self.pending[c]) > self.K}
        if surplus:
            level = _water_level(np.array(list(surplus.values())), excess)
            for c, s in surplus.items():
                if s > level:
                    waiting = self.pending[c]
                    cut = s - level
                    self._drop(waiting[-cut:])
                    del waiting[-cut:]
                    excess -= cut
        if excess > 0:
            for c in [c for c in self.pending if c not in self.ready]:  # not ready: oldest first
                excess -= len(self.pending[c])
                self._drop(self.pending.pop(c))
                if excess <= 0:
                    break


def _water_level(surplus: np.ndarray, excess: int) -> int:
    """The largest level L >= 0 such that trimming every surplus above L frees at least ``excess``
    (0 when even all of it is not enough): the most over-represented classes are cut first, evenly."""
    if surplus.sum() <= excess:
        return 0
    lo, hi = 0, int(surplus.max())  # freed(lo) >= excess > freed(hi) = 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if np.maximum(surplus - mid, 0).sum() >= excess:
            lo = mid
        else:
            hi = mid
    return lo
