"""Evaluation reading: every sample of a split exactly once, balanced by samples over ranks and loader workers.

Each reader (one DataLoader worker of one rank) streams a contiguous run of the split in its own order
(:func:`~.epochs.split_ranges`), starting inside a shard where it must (the per-shard index gives the byte
offset): a split of 20 shards keeps 64 ranks busy. Each sample comes with its position in the split, so
per-rank results concatenate back in split order, and with its key.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..dist import env_rank_and_world
from .epochs import split_ranges
from .images import to_rgb
from .stream import (
    ShardSet,
    SkipCounter,
    _image_bytes,
    _label,
    _open,
    ranges_ahead,
    read_samples,
    resolve_shards,
    sample_spans,
)
from .tarindex import idx_name, load_shard_index, read_range
from .transforms import eval_transform


def capped_counts(counts: list[int], limit: int | None) -> list[int]:
    """The shards' counts when only the split's first ``limit`` samples are read."""
    if limit is None:
        return list(counts)
    out, left = [], int(limit)
    for c in counts:
        out.append(min(c, left))
        left -= out[-1]
    return out


class EvalDataset(torch.utils.data.IterableDataset):
    """``(image uint8 (3, S, S), label, position in the split, key)`` for every sample once across readers.

    ``limit`` reads only the split's first ``limit`` samples (a cap over all ranks, not per rank). ``rank`` /
    ``world`` default to the process group or ``RANK`` / ``WORLD_SIZE``. Undecodable samples are skipped and
    counted (past ``max_skip_rate`` the reader raises :class:`~distpddm.errors.BadDataError`)."""

    def __init__(
        self,
        shards: ShardSet | str | Path,
        image_size: int = 224,
        max_skip_rate: float = 0.01,
        transform: Callable[[bytes], torch.Tensor] | None = None,
        *,
        limit: int | None = None,
        rank: int | None = None,
        world: int | None = None,
    ):
        super().__init__()
        self.shards = shards if isinstance(shards, ShardSet) else resolve_shards(shards)
        if self.shards.counts is None:
            raise ValueError(
                f"{self.shards.urls[:1]}...: evaluation needs the split's index.json and per-shard indexes "
                "(build the split with `distpddm shards build`)"
            )
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {limit}")
        self.counts = capped_counts(self.shards.counts, limit)
        self.first = np.concatenate([[0], np.cumsum(self.shards.counts)[:-1]]).astype(np.int64)
        self.max_skip_rate, self.rank, self.world = max_skip_rate, rank, world
        self.transform = transform or eval_transform(image_size)

    @property
    def samples(self) -> int:
        return sum(self.counts)

    def __iter__(self):
        rank, world = env_rank_and_world() if self.rank is None else (self.rank, self.world or 1)
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        counter = SkipCounter(self.max_skip_rate)
        plan = [r for r in split_ranges(self.counts, rank * workers + worker, world * workers) if r[2] > r[1]]
        urls = self.shards.urls
        walk = ranges_ahead(plan, urls, self.shards.counts, counter)  # a remote range's next one fetched ahead
        with contextlib.closing(walk):
            for shard, lo, hi, index, opened in walk:
                # a read error that may pass reopens the shard from its sample; spent retries skip and count the rest
                for n, sample in read_samples(urls[shard], index, list(range(lo, hi)), counter, opened):
                    item = None if sample is None else self._item(urls[shard], shard, n, sample, counter)
                    if item is not None:
                        yield item

    def _item(self, url: str, shard: int, n: int, sample, counter: SkipCounter):
        if isinstance(sample, Exception):
            counter.skip(f"{url}:{n}", f"sample does not parse ({type(sample).__name__}: {sample})")
            return None
        try:
            label, img = _label(sample), self.transform(_image_bytes(sample))
        except Exception as e:  # noqa: BLE001 -- any decoding failure is a bad sample
            counter.skip(f"{url}:{sample.get('__key__', n)}", f"{type(e).__name__}: {e}")
            return None
        counter.ok()
        return img, label, int(self.first[shard] + n), str(sample.get("__key__", n))


def eval_dataset(
    shards: ShardSet | str | Path, image_size: int = 224, max_skip_rate: float = 0.01, **kwargs
) -> torch.utils.data.IterableDataset:
    """The reader of every sample once for this split: :class:`EvalDataset` for a built (class-chunked) split,
    :class:`.foreign.ForeignEvalDataset` for one indexed in place (``limit``, ``rank``, ``world`` for both)."""
    shard_set = shards if isinstance(shards, ShardSet) else resolve_shards(shards)
    if shard_set.foreign:
        from .foreign import ForeignEvalDataset

        return ForeignEvalDataset(shard_set, image_size, max_skip_rate, **kwargs)
    return EvalDataset(shard_set, image_size, max_skip_rate, **kwargs)


def read_images(shards: ShardSet | str | Path, positions, size: int = 64) -> list:
    """The images at these split positions as RGB PIL thumbnails at most ``size`` px (None where unreadable):
    for reports, a few dozen samples."""
    from PIL import Image

    shards = shards if isinstance(shards, ShardSet) else resolve_shards(shards)
    if shards.foreign:
        from .foreign import ForeignEvalDataset

        raw = ForeignEvalDataset(shards).raw(positions)
    else:
        raw = [_built_image_bytes(shards, p) for p in positions]
    out = []
    for data in raw:
        try:
            if data is None:
                raise ValueError("unreadable")
            img = Image.open(io.BytesIO(data))
            img = to_rgb(img)
            img.thumbnail((size, size))
            out.append(img)
        except Exception:  # noqa: BLE001 -- a thumbnail is an illustration; the report marks it missing
            out.append(None)
    return out


def _built_image_bytes(shards: ShardSet, p: int) -> bytes | None:
    first = np.concatenate([[0], np.cumsum(shards.counts)])
    shard = int(np.searchsorted(first, p, side="right") - 1)
    n = int(p - first[shard])
    try:
        url = shards.urls[shard]
        index = load_shard_index(idx_name(url))
        with _open(url, sample_spans(index, [(n, n + 1)])) as f:
            _, sample = next(read_range(f, index, n, n + 1))
        if isinstance(sample, Exception):
            raise sample
        return _image_bytes(sample)
    except Exception:  # noqa: BLE001 -- a thumbnail is an illustration; the report marks it missing
        return None
