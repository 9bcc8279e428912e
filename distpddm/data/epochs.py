"""Which samples each reader streams in each epoch: a pure function of (seed, epoch, reader, readers).

A *reader* is one DataLoader worker of one rank: ``reader = rank * workers + worker`` of ``world * workers``.
Per epoch the shards are permuted (seeded by ``seed`` and the epoch, the same on every rank), laid end to end,
and the sample sequence is cut into ``readers`` contiguous ranges of equal size (+-1). Within an epoch the
readers' ranges are disjoint and cover every sample once; a range may start or end inside a shard (the
per-shard index gives the byte offset), so more readers than shards still split the data, by sample ranges.
The cut points also move, each epoch, by a drawn number of samples (the range that crosses the end of the
sequence wraps around to its start; which reader holds it is drawn too, and it may read one shard as two
ranges), so that a split of few shards is not read the same way every epoch: a shard's stored order is fixed
at build time, and read alike every epoch the batcher left out the same samples every epoch (a class's last
short chunk, the surplus it trims from a large class, chunks that fall in a reader's share with too few of
their class). The clip art of ``experiments/protocol`` (one shard, one reader) never placed 170 of
its 2,230 samples in a batch in 28 epochs; with the moving cut, 2-10 (``bench/sample_coverage.py``,
docs/benchmarks.md).

Random streams used elsewhere derive from :func:`seed_sequence`, so every rank, worker, epoch and batch
draws from its own generator whatever process it runs in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Names how readers' ranges are cut in saved stream positions (``PKBatchDataset.layout``): a position saved
#: under another way replays other samples, so a resume across a change starts the next epoch instead.
RANGES_POLICY = "moving-cut"


def seed_sequence(*keys: int) -> np.random.SeedSequence:
    """A generator seed from non-negative integers (a seed, then rank, worker, epoch, ...)."""
    if any(k < 0 for k in keys):
        raise ValueError(f"seed keys must be non-negative integers, got {keys}")
    return np.random.SeedSequence([int(k) for k in keys])


def shard_order(n_shards: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng(seed_sequence(seed, epoch, 0)).permutation(n_shards)


def reader_ranges(
    counts: Sequence[int], seed: int, epoch: int, reader: int, readers: int, *, moving_cut: bool = True
) -> list[tuple[int, int, int]]:
    """``[(shard, lo, hi), ...]``: the samples ``lo .. hi - 1`` of each shard this reader streams, in order.

    ``counts`` are the shards' sample counts (from ``index.json``): O(shards) integer work, no I/O.
    ``moving_cut=False`` gives the fixed cut points of before, for comparisons (``bench/sample_coverage.py``)."""
    shift = np.random.default_rng(seed_sequence(seed, epoch, 4)).integers(max(1, int(np.sum(counts))))
    return _cut(counts, shard_order(len(counts), seed, epoch), reader, readers, int(shift) if moving_cut else 0)


def split_ranges(counts: Sequence[int], reader: int, readers: int) -> list[tuple[int, int, int]]:
    """As :func:`reader_ranges`, in the split's own order (no permutation): evaluation reads every sample
    once, each reader a contiguous run of the split, so results concatenate back in split order."""
    return _cut(counts, np.arange(len(counts)), reader, readers)


def _cut(
    counts: Sequence[int], order: np.ndarray, reader: int, readers: int, shift: int = 0
) -> list[tuple[int, int, int]]:
    """The reader's share of the shards laid end to end in ``order``, the cut points moved by ``shift`` samples
    (the share that crosses the end wraps around to the start)."""
    if not 0 <= reader < readers:
        raise ValueError(f"reader {reader} outside 0..{readers - 1}")
    counts = np.asarray(counts, dtype=np.int64)
    ends = np.cumsum(counts[order])
    total = int(ends[-1]) if len(ends) else 0
    start, stop = shift + total * reader // readers, shift + total * (reader + 1) // readers
    if stop <= total:
        return _within(counts, order, ends, start, stop)
    if start >= total:
        return _within(counts, order, ends, start - total, stop - total)
    return _within(counts, order, ends, start, total) + _within(counts, order, ends, 0, stop - total)


def _within(counts: np.ndarray, order: np.ndarray, ends: np.ndarray, start: int, stop: int) -> list:
    ranges = []
    first = int(np.searchsorted(ends, start, side="right"))  # the shard holding sample `start`
    for i in range(first, len(order)):
        begin = int(ends[i] - counts[order[i]])
        if begin >= stop:
            break
        lo, hi = max(start, begin) - begin, min(stop, int(ends[i])) - begin
        if hi > lo:
            ranges.append((int(order[i]), lo, hi))
    return ranges
