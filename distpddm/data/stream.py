"""The training stream over WebDataset shards: P x K batches (evaluation reads through :mod:`.evalset`).

Training (:class:`PKBatchDataset`): every DataLoader worker of every rank is a *reader*. Per epoch the
readers stream disjoint, equal ranges of the split (:mod:`.epochs`) -- a pure function of (seed, epoch,
rank, world size, worker) -- and form P x K batches from them (:mod:`.batcher`, whose sampling policy is
stated there). Each batch says where it comes from (:class:`BatchInfo`); a :class:`StreamState` built from
the batches a rank consumed is what a checkpoint saves, and a dataset started from it yields exactly the
batches an uninterrupted run would have yielded next: the stream is replayed from the shard indexes' labels,
without reading images, and only the samples still waiting in the batcher are fetched again.

Bad samples (an image that does not decode, a missing label) and unreadable shards are skipped with a
warning naming shard and key, and counted; past ``max_skip_rate`` the run stops with :class:`BadDataError`
rather than training on quietly shrinking data. A read error that may pass (an ``OSError`` opening a shard or
its index, or part-way through reading it: an NFS hiccup, an S3 503; over HTTP, aiohttp's 5xx, 429, reset or
timeout, also when fsspec reports it as a ``FileNotFoundError``) is first retried, ``READ_RETRIES`` times with
exponential backoff (:mod:`.retry`), from the sample where it failed: a retry that succeeds changes no batch.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import hashlib
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..dist import env_rank_and_world
from ..errors import BadDataError, CannotBatchError, StorageUnavailable
from .batcher import POLICY as BATCHER_POLICY
from .batcher import PKBatcher
from .epochs import RANGES_POLICY, reader_ranges, seed_sequence
from .images import IMAGE_EXTENSIONS
from .ranges import ReadAhead
from .retry import READ_RETRIES, describe_error, is_read_error, retry_after
from .shards import FOREIGN_LAYOUT, INCOMPLETE, INDEX, IncompleteBuildError, incomplete_message
from .tarindex import ShardIndex, idx_name, load_shard_index, read_range
from .transforms import train_transform

log = logging.getLogger("distpddm.data")


# --------------------------------------------------------------------------------------------- shard lists


@dataclass(frozen=True)
class ShardSet:
    urls: list[str]
    classes: list[str] | None
    samples: int | None
    counts: list[int] | None = None  # samples per shard (index.json); needed for training
    class_counts: list[int] | None = None
    chunk_size: int | None = None
    #: ``"foreign"`` for a split that `distpddm shards index` wrote (read by :mod:`.foreign`; ``counts`` is None
    #: then, so the class-chunked readers refuse it), with its folder and selection file (named by its hash).
    layout: str | None = None
    split_dir: str | None = None
    selection: str | None = None

    @property
    def digest(self) -> str:
        """Identifies the split's layout (shard names and sizes): a saved stream position is valid for it."""
        layout = [[u.rsplit("/", 1)[-1] for u in self.urls], self.counts]
        h = hashlib.sha256(json.dumps(layout + ([self.selection] if self.selection else [])).encode())
        return h.hexdigest()[:16]

    @property
    def foreign(self) -> bool:
        return self.layout == FOREIGN_LAYOUT


def resolve_shards(spec: str | Path) -> ShardSet:
    """A split folder (or its ``index.json``, local or any fsspec URL), or a webdataset URL pattern."""
    spec = str(spec)
    if Path(spec).is_dir():
        spec = str(Path(spec) / INDEX)
    if spec.endswith(".json"):
        import fsspec

        base = spec.rsplit("/", 1)[0] if "/" in spec else "."
        try:
            with fsspec.open(spec, "r") as f:
                index = json.load(f)
        except FileNotFoundError:
            if _exists(f"{base}/{INCOMPLETE}"):
                raise IncompleteBuildError(incomplete_message(base)) from None
            raise FileNotFoundError(f"no {INDEX} at {spec}: build the split with `distpddm shards build`") from None
        shards = index["shards"]
        if index.get("layout") == FOREIGN_LAYOUT:  # its samples are spread over shards, not chunked by class
            return ShardSet(
                [s.get("url") or f"{base}/{s['name']}" for s in shards],
                index["classes"],
                index["samples"],
                class_counts=index.get("class_counts"),
                layout=FOREIGN_LAYOUT,
                split_dir=base,
                selection=index.get("selection"),
            )
        return ShardSet(
            [f"{base}/{s['name']}" for s in shards],
            index["classes"],
            index["samples"],
            counts=[s["samples"] for s in shards],
            class_counts=index.get("class_counts"),
            chunk_size=index.get("chunk_size"),
        )
    import webdataset as wds

    urls = wds.shardlists.expand_urls(spec)
    if not urls:
        raise FileNotFoundError(f"no shards match {spec!r}")
    return ShardSet(urls, None, None)


def _exists(url: str) -> bool:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        return fs.exists(path)
    except Exception:  # noqa: BLE001 -- only to word an error better: a store that cannot say says no
        return False


def _open(url: str, spans: list[tuple[int, int]] | None = None):
    """A shard to read: a local file, or a remote one that the byte ``spans`` about to be read (``[start,
    end)``, ascending) are fetched ahead of (:class:`.ranges.ReadAhead`)."""
    if "://" in url:
        if spans is not None:
            return ReadAhead(url, spans)
        import fsspec

        return fsspec.open(url, "rb").open()
    return open(url, "rb", buffering=1 << 20)  # noqa: SIM115 -- closed by the caller


def sample_spans(index: ShardIndex, runs) -> list[tuple[int, int]]:
    """The byte spans of sample runs ``[lo, hi)`` of a shard."""
    return [(int(index.offsets[lo]), int(index.offsets[hi])) for lo, hi in runs]


def _after(attempts: int) -> str:
    return f" after {attempts} retries" if attempts else ""


def _runs(numbers: list[int]) -> Iterator[tuple[int, int]]:
    """Ascending sample numbers as ``[lo, hi)`` runs of consecutive ones."""
    start = 0
    for i in range(1, len(numbers) + 1):
        if i == len(numbers) or numbers[i] != numbers[i - 1] + 1:
            yield numbers[start], numbers[i - 1] + 1
            start = i


# ------------------------------------------------------------------------------------------------ bad data


class SkipCounter:
    """Counts good and skipped samples in one worker; raises past the skip-rate threshold."""

    def __init__(self, max_skip_rate: float = 0.01, min_samples: int = 200):
        if not 0 <= max_skip_rate <= 1:
            raise ValueError(f"max_skip_rate must be in [0, 1], got {max_skip_rate}")
        self.max_skip_rate, self.min_samples = max_skip_rate, min_samples
        self.seen = self.skipped = self.unanswered = 0
        self.last: list[str] = []

    def ok(self) -> None:
        self.seen += 1

    def skip(self, where: str, why: str, count: int = 1, unanswered: bool = False) -> None:
        """``unanswered``: skipped because the storage kept failing with errors that may pass, retries spent."""
        self.seen += count
        self.skipped += count
        self.unanswered += count if unanswered else 0
        self.last = (self.last + [f"{where} ({why})"])[-5:]
        log.warning("skipping %s: %s", where, why)
        self.check()

    def check(self) -> None:
        if self.seen >= self.min_samples and self.skipped > self.max_skip_rate * self.seen:
            if 2 * self.unanswered > self.skipped:  # an outage, not bad data: the run may be resumed
                raise StorageUnavailable(
                    f"{self.skipped} of {self.seen} samples skipped, {self.unanswered} of them because the storage "
                    f"did not answer after {READ_RETRIES} retries; last: {'; '.join(self.last)}. The run stops "
                    "(on Ray, restarted from the last checkpoint); the same command resumes once it answers."
                )
            raise BadDataError(
                f"{self.skipped} of {self.seen} samples skipped ({100 * self.skipped / self.seen:.1f}%), above "
                f"max_skip_rate={self.max_skip_rate:.2%}; last: {'; '.join(self.last)}. Verify the shards with "
                "`distpddm shards verify`, or raise data.max_skip_rate if this loss is acceptable."
            )


def _where(sample: dict) -> str:
    return f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"


def _label(sample: dict) -> int:
    return int(sample["cls"])


def _image_bytes(sample: dict) -> bytes:
    for k in IMAGE_EXTENSIONS:
        if k in sample:
            return sample[k]
    raise KeyError("no image field")


def _key_index(sample: dict) -> int:
    """The sample's position in its split, from a ``s<index>`` key (-1 for keys of another form)."""
    key = sample.get("__key__", "")
    return int(key[1:]) if key[:1] == "s" and key[1:].isdigit() else -1


# ------------------------------------------------------------------------------------------ stream position


@dataclass(frozen=True)
class BatchInfo:
    """Where a batch comes from. ``index`` counts the batches the reader formed in this epoch (one that could
    not be decoded still counts); ``read`` / ``used`` / ``dropped`` are the reader's sample counts so far in
    this epoch (:class:`~distpddm.data.batcher.BatcherStats`)."""

    worker: int  # the logical loader worker of this rank
    epoch: int
    index: int
    read: int = 0
    used: int = 0
    dropped: int = 0


class Batch(NamedTuple):
    images: torch.Tensor  # uint8 (P*K, 3, S, S): normalise on the device (normalize_batch)
    labels: torch.Tensor  # int64 (P*K,), classes contiguous
    keys: torch.Tensor  # int64 (P*K,): each sample's index in the split (-1 where a bad image was replaced)
    info: BatchInfo


@dataclass
class StreamState:
    """The data position of one rank: for each loader worker, the epoch and the next batch index, and which
    worker the DataLoader takes the next batch from. ``layout`` names what the positions are valid for; where
    it no longer holds (another world size, say), every rank restarts at the epoch after ``epoch_all``."""

    layout: dict
    positions: dict[int, tuple[int, int]] = field(default_factory=dict)
    next_worker: int = 0
    consumed: int = 0
    epoch_all: int = 0  # the furthest epoch any rank had reached when saved (the trainer fills it in)

    def advance(self, info: BatchInfo) -> None:
        """Record a batch the trainer consumed (skipped steps included: their batch is spent)."""
        self.positions[info.worker] = (info.epoch, info.index + 1)
        self.next_worker = (info.worker + 1) % self.layout["workers"]
        self.consumed += 1

    @property
    def epoch(self) -> int:
        return max((e for e, _ in self.positions.values()), default=0)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self) | {"positions": {str(w): p for w, p in self.positions.items()}})

    @classmethod
    def from_json(cls, text: str) -> StreamState:
        d = json.loads(text)
        d["positions"] = {int(w): tuple(p) for w, p in d["positions"].items()}
        return cls(**d)


# ------------------------------------------------------------------------------------------ training stream


@dataclass
class _Unit:
    """One range of one shard in a reader's epoch, and where its samples start in the reader's sequence."""

    url: str
    lo: int
    hi: int
    first: int  # the reader's position of sample lo
    index: ShardIndex


class PKStream(torch.utils.data.IterableDataset):
    """What both training streams share (this module's class-chunked one and :mod:`.foreign`'s): checked batch
    arguments, and a position per loader worker (a :class:`StreamState`) that ``start`` resumes from when it was
    saved for the same :meth:`layout`. A subclass gives the layout and one reader's epoch (:meth:`_epoch`)."""

    start: StreamState | None
    max_skip_rate: float

    @staticmethod
    def check_batch_args(classes_per_batch: int, images_per_class: int, seed: int) -> None:
        if images_per_class < 2:
            raise ValueError(f"images_per_class must be >= 2, got {images_per_class}")
        if classes_per_batch < 2:
            raise ValueError(f"classes_per_batch must be >= 2, got {classes_per_batch}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")

    def layout(self, world: int, workers: int) -> dict:
        """What a saved position is valid for."""
        raise NotImplementedError

    def _epoch(self, epoch: int, reader: int, readers: int, worker: int, counter, skip: int) -> Iterator[Batch]:
        """Batches ``skip``, ``skip + 1``, ... of one reader's epoch."""
        raise NotImplementedError

    def start_state(self, world: int, workers: int, warn: bool = True) -> StreamState:
        """The position this dataset starts from on a rank of ``world`` with ``workers`` loader workers (a copy:
        the trainer advances it with the batches it consumes and saves it in checkpoints)."""
        layout = self.layout(world, workers)
        if self.start is None:
            return StreamState(layout)
        if self.start.layout == layout:
            return StreamState.from_json(self.start.to_json())
        first = max(self.start.epoch, self.start.epoch_all) + 1  # the same epoch on every rank
        if warn:
            changed = sorted(k for k in layout if self.start.layout.get(k) != layout[k])
            log.warning(
                "the saved data position was made for other %s; the stream restarts at the start of epoch %d",
                ", ".join(changed) or "settings (this rank had none saved)",
                first,
            )
        return StreamState(layout, {w: (first, 0) for w in range(workers)}, epoch_all=first)

    def __iter__(self) -> Iterator[Batch]:
        rank, world = env_rank_and_world()
        info = torch.utils.data.get_worker_info()
        physical, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start = self.start_state(world, workers, warn=info is None)  # a loader worker leaves it to the trainer
        worker = (physical + start.next_worker) % workers  # the DataLoader asks physical worker 0 first
        epoch, skip = start.positions.get(worker, (0, 0))
        counter = SkipCounter(self.max_skip_rate)
        while True:
            yield from self._epoch(epoch, rank * workers + worker, world * workers, worker, counter, skip)
            epoch, skip = epoch + 1, 0


class PKBatchDataset(PKStream):
    """Endless P x K training batches (:class:`Batch`, images ``uint8``) from a split built by
    ``distpddm shards build`` (its ``index.json`` and per-shard ``.idx.npz``).

    Use with ``DataLoader(ds, batch_size=None, num_workers=n)``. ``transform(bytes, rng)`` maps encoded bytes
    to an image tensor, drawing its randomness from ``rng`` (a ``random.Random`` seeded per batch). ``start``
    (a :class:`StreamState`) resumes where a run stopped; with another world size, worker count, batch shape,
    seed or split than it was saved for, the stream starts at the beginning of the next epoch instead.
    """

    def __init__(
        self,
        shards: ShardSet | str | Path,
        classes_per_batch: int,
        images_per_class: int,
        image_size: int = 224,
        buffer_images: int | None = None,
        max_skip_rate: float = 0.01,
        seed: int = 0,
        transform: Callable[[bytes, random.Random], torch.Tensor] | None = None,
        start: StreamState | None = None,
    ):
        super().__init__()
        shard_set = shards if isinstance(shards, ShardSet) else resolve_shards(shards)
        if shard_set.foreign:
            raise ValueError(
                f"{shards}: a pre-shuffled split indexed in place (`distpddm shards index`): read it with "
                "distpddm.data.foreign.ForeignPKDataset (the trainer picks it), not the class-chunked stream"
            )
        if shard_set.counts is None:
            raise ValueError(
                f"training reads a split through its index.json and per-shard indexes; {shards!r} has none. "
                "Build the shards with `distpddm shards build`."
            )
        self.check_batch_args(classes_per_batch, images_per_class, seed)
        self.urls, self.counts, self.split_digest = shard_set.urls, shard_set.counts, shard_set.digest
        self.P, self.K = classes_per_batch, images_per_class
        self.buffer_images = buffer_images or 8 * classes_per_batch * images_per_class
        if self.buffer_images < self.P * self.K:
            raise ValueError(f"buffer_images ({self.buffer_images}) must hold one batch ({self.P * self.K})")
        self.max_skip_rate, self.seed, self.start = max_skip_rate, seed, start
        self.transform = transform or train_transform(image_size)

    def layout(self, world: int, workers: int) -> dict:
        """What a saved position is valid for."""
        return {
            "world": world,
            "workers": workers,
            "P": self.P,
            "K": self.K,
            "buffer": self.buffer_images,
            "seed": self.seed,
            "split": self.split_digest,
            "batcher": BATCHER_POLICY,
            "ranges": RANGES_POLICY,
        }

    def _epoch(self, epoch: int, reader: int, readers: int, worker: int, counter, skip: int) -> Iterator[Batch]:
        return _EpochReader(self, epoch, reader, readers, worker, counter).run(skip)


def read_shard_index(url: str, count: int, counter: SkipCounter, samples: int) -> ShardIndex | None:
    """The per-shard index of the shard at ``url`` (``count`` samples, per index.json), as the training stream
    and the eval reader open it: a read error that may pass is retried (:func:`retry_after`); a damaged index,
    or one that stays unreadable, is None, with the shard's ``samples`` to be read counted as skipped."""
    attempt = 0
    while True:
        try:
            index = load_shard_index(idx_name(url))
            if len(index) != count:
                raise ValueError(f"it lists {len(index)} samples, index.json {count}: rebuild the split")
            return index
        except Exception as e:
            if not isinstance(e, (ValueError, KeyError)) and not is_read_error(e):
                raise
            if retry_after(idx_name(url), e, attempt):
                attempt += 1
                continue
            why = f"no usable shard index {idx_name(url)} ({describe_error(e)}){_after(attempt)}"
            counter.skip(url, why, samples, unanswered=attempt > 0)
            return None


def read_samples(
    url: str, index: ShardIndex, numbers: list[int], counter: SkipCounter, opened=None
) -> Iterator[tuple[int, dict | Exception | None]]:
    """``(n, raw sample | exception | None)`` for samples ``numbers`` (ascending) of the shard at ``url``, as
    the training stream and the eval reader read them. A read error opening the shard or reading it
    (:func:`is_read_error`: an ``OSError``, or aiohttp's, which :func:`.read_range` does not catch) is retried
    (:func:`retry_after`) from the sample it failed at, so a retry that succeeds gives exactly the samples an
    undisturbed read gives; when the retries are spent (or the error does not pass: a missing file), the
    samples not yet read are counted as skipped, once, naming the shard and the error, and come back as None.
    ``opened``: the shard already opened over these samples' spans (:class:`_NextRange`), for the first try."""
    done, attempt = 0, 0
    while done < len(numbers):
        error = None
        try:
            f, opened = opened or _open(url, sample_spans(index, _runs(numbers[done:]))), None
        except Exception as e:
            if not is_read_error(e):
                raise
            error = e
        else:
            with f:
                for lo, hi in _runs(numbers[done:]):
                    reader = read_range(f, index, lo, hi)
                    try:
                        for n, sample in reader:
                            if isinstance(sample, OSError):  # from this sample on, through a new handle
                                error = sample
                                break
                            done, attempt = done + 1, 0
                            yield n, sample
                    except Exception as e:  # raised by the read itself, not yielded as the sample's
                        if not is_read_error(e):
                            raise
                        error = e
                    finally:
                        reader.close()
                    if error is not None:
                        break
            if error is None:
                return
        if retry_after(url, error, attempt):
            attempt += 1
            continue
        why = f"shard unreadable ({describe_error(error)}){_after(attempt)}"
        counter.skip(url, why, len(numbers) - done, unanswered=attempt > 0)
        for n in numbers[done:]:
            yield n, None
        return


class _NextRange:
    """A remote shard range's index and first parts, fetched while the range before it is read: each range
    would otherwise open with three round trips (the index's HEAD and GET, then the first part's GET) that no
    read-ahead covers. Only an optimisation: whatever fails here is read again, with retries, when due."""

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None
        self._pending: tuple[str, int, int, Future] | None = None

    def start(self, url: str, count: int, lo: int, hi: int, parts: bool) -> None:
        """Fetch samples ``[lo, hi)`` of the shard at ``url``: its index, and (``parts``) their first parts."""
        self.close_pending()
        if "://" not in url:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="next-range")
        self._pending = (url, lo, hi, self._pool.submit(_open_range, url, count, lo, hi, parts))

    def take(self, url: str, lo: int, hi: int) -> tuple[ShardIndex | None, ReadAhead | None]:
        """What was fetched for this range, or ``(None, None)`` (anything fetched for another is closed)."""
        if self._pending is None or self._pending[:3] != (url, lo, hi):
            self.close_pending()
            return None, None
        pending, self._pending = self._pending, None
        return pending[3].result()

    def close_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not pending[3].cancel():  # not started: nothing to close
            pending[3].add_done_callback(_close_opened)

    def close(self) -> None:
        self.close_pending()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def ranges_ahead(
    plan: list[tuple[int, int, int]], urls: list[str], counts: list[int], counter: SkipCounter, parts=lambda: True
) -> Iterator[tuple[int, int, int, ShardIndex, ReadAhead | None]]:
    """``(shard, lo, hi, its shard index, the ReadAhead over its samples or None)`` for each range of ``plan``, as
    the training stream and the eval reader walk them: a remote range's index and first parts (``parts()``, asked
    as it starts) are fetched while the range before it is read (:class:`_NextRange`); a range whose index does
    not read is skipped and counted (:func:`read_shard_index`). The ReadAhead is closed once its range is done."""
    with contextlib.closing(_NextRange()) as ahead:
        for i, (shard, lo, hi) in enumerate(plan):
            index, opened = ahead.take(urls[shard], lo, hi)
            if i + 1 < len(plan):
                after, lo2, hi2 = plan[i + 1]
                ahead.start(urls[after], counts[after], lo2, hi2, parts=parts())
            index = index or read_shard_index(urls[shard], counts[shard], counter, hi - lo)
            if index is None:
                continue
            try:
                yield shard, lo, hi, index, opened
            finally:  # its reader closed it, or never started
                if opened is not None:
                    opened.close()


def _close_opened(future: Future) -> None:
    if not future.cancelled() and future.exception() is None and future.result()[1] is not None:
        future.result()[1].close()


def _open_range(url: str, count: int, lo: int, hi: int, parts: bool) -> tuple[ShardIndex | None, ReadAhead | None]:
    try:
        index = load_shard_index(idx_name(url))
        if len(index) != count:
            return None, None
        return index, ReadAhead(url, sample_spans(index, [(lo, hi)])).start() if parts else None
    except Exception:  # noqa: BLE001 -- read again when due, with retries and counting
        return None, None


class _EpochReader:
    """One reader's epoch: plan batches from labels, read (or, while replaying, skip) the samples' bytes."""

    def __init__(self, ds: PKBatchDataset, epoch: int, reader: int, readers: int, worker: int, counter):
        self.ds, self.epoch, self.reader, self.readers, self.worker = ds, epoch, reader, readers, worker
        self.counter = counter
        rng = np.random.default_rng(seed_sequence(ds.seed, epoch, reader, readers, 1))
        self.batcher = PKBatcher(ds.P, ds.K, ds.buffer_images, rng)
        self.units: list[_Unit] = []
        self.held: dict[int, tuple[int, dict | None]] = {}  # position -> (label, raw sample or None if bad)

    def run(self, skip: int) -> Iterator[Batch]:
        """Batches ``skip``, ``skip + 1``, ... of this epoch (``skip`` > 0: replayed up to there from labels)."""
        ds, batcher = self.ds, self.batcher
        replaying = skip > 0
        emitted = 0
        waiting: list[tuple[int, list[int]]] = []  # (batch index, positions) due but not yet yielded
        position = 0
        plan = list(reader_ranges(ds.counts, ds.seed, self.epoch, self.reader, self.readers))
        walk = ranges_ahead(plan, ds.urls, ds.counts, self.counter, parts=lambda: not replaying)
        with contextlib.closing(walk):
            for shard, lo, hi, index, opened in walk:
                unit = _Unit(ds.urls[shard], lo, hi, position, index)
                self.units.append(unit)
                position += hi - lo
                samples = None if replaying else self._samples(unit, lo, opened)
                try:
                    for n in range(lo, hi):
                        p, label = unit.first + n - lo, int(unit.index.labels[n])
                        if samples is not None:
                            self.held[p] = (label, self._check(next(samples), label, unit))
                        else:  # replayed: read before the stop, as the skip rate's denominator knew then
                            self.counter.ok()
                        for batch in batcher.push(p, label):
                            if emitted >= skip:
                                waiting.append((emitted, batch))
                            emitted += 1
                        self._forget_dropped()
                        if replaying and emitted >= skip:  # caught up: fetch what the batcher still holds, go live
                            replaying = False
                            due = [p for _, b in waiting for p in b] + [p for w in batcher.pending.values() for p in w]
                            self._fetch(due)
                            samples = self._samples(unit, n + 1) if n + 1 < hi else None
                        if not replaying:
                            yield from self._make_all(waiting)
                finally:
                    if samples is not None:
                        samples.close()
        for batch in batcher.finish():
            if emitted >= skip:
                waiting.append((emitted, batch))
            emitted += 1
        self._forget_dropped()
        if replaying:
            self._fetch([p for _, b in waiting for p in b])
        yield from self._make_all(waiting)
        if emitted == 0:
            raise self._cannot_batch()
        log.debug("reader %d/%d epoch %d: %s", self.reader, self.readers, self.epoch, batcher.stats)

    # ------------------------------------------------------------------------------------------- reading

    def _samples(self, unit: _Unit, start: int, opened: ReadAhead | None = None):
        """``(n, raw sample | exception | None)`` from ``start`` to the unit's end (see :func:`read_samples`)."""
        return read_samples(unit.url, unit.index, list(range(start, unit.hi)), self.counter, opened)

    def _read(self, unit: _Unit, numbers: list[int]) -> Iterator[tuple[int, dict | Exception | None]]:
        return read_samples(unit.url, unit.index, numbers, self.counter)

    def _check(self, item: tuple[int, dict | Exception | None], label: int, unit: _Unit) -> dict | None:
        n, sample = item
        if sample is None:
            return None
        if isinstance(sample, Exception):
            self.counter.skip(f"{unit.url}:#{n}", f"unreadable ({type(sample).__name__}: {sample})")
            return None
        sample["__url__"] = unit.url
        try:
            got = _label(sample)
            _image_bytes(sample)
        except (KeyError, ValueError) as e:
            self.counter.skip(_where(sample), f"missing or bad label/image: {e}")
            return None
        if got != label:
            self.counter.skip(_where(sample), f"label {got}, but the shard index says {label} (stale index?)")
            return None
        self.counter.ok()
        return sample

    def _fetch(self, positions: list[int]) -> None:
        """Read the given positions' samples again (a resumed stream's batcher still holds them)."""
        starts = [u.first for u in self.units]
        by_unit: dict[int, list[int]] = {}
        for p in sorted(set(positions)):
            by_unit.setdefault(bisect.bisect_right(starts, p) - 1, []).append(p)
        for u, todo in by_unit.items():
            unit = self.units[u]
            local = [unit.lo + p - unit.first for p in todo]
            for p, item in zip(todo, self._read(unit, local), strict=True):
                label = int(unit.index.labels[item[0]])
                self.held[p] = (label, self._check(item, label, unit))

    def _forget_dropped(self) -> None:
        for p in self.batcher.dropped:
            self.held.pop(p, None)
        self.batcher.dropped.clear()

    # ------------------------------------------------------------------------------------------- batches

    def _make_all(self, waiting: list[tuple[int, list[int]]]) -> Iterator[Batch]:
        while waiting:
            index, positions = waiting.pop(0)
            batch = self._make(index, positions)
            if batch is not None:
                yield batch

    def _make(self, index: int, positions: list[int]) -> Batch | None:
        ds = self.ds
        rng = random.Random(
            int(seed_sequence(ds.seed, self.epoch, self.reader, self.readers, 2, index).generate_state(1)[0])
        )
        images, labels, keys, good_by_class = [], [], [], {}
        for p in positions:
            label, sample = self.held.pop(p)
            img = None
            if sample is not None:
                try:
                    img = ds.transform(_image_bytes(sample), rng)
                except Exception as e:  # noqa: BLE001 -- any decoder failure is a bad sample
                    self.counter.skip(_where(sample), f"image does not decode ({type(e).__name__}: {e})")
            images.append(img)
            labels.append(label)
            keys.append(_key_index(sample) if img is not None else -1)
            if img is not None:
                good_by_class.setdefault(label, []).append(img)
        for n, img in enumerate(images):
            if img is None:  # keep the P x K shape: reuse another image of the same class
                same = good_by_class.get(labels[n])
                if not same:
                    return None
                images[n] = same[n % len(same)]
        stats = self.batcher.stats
        info = BatchInfo(self.worker, self.epoch, index, stats.read, stats.used, stats.dropped)
        return Batch(stack_samples(images), torch.tensor(labels), torch.tensor(keys), info)

    def _cannot_batch(self) -> CannotBatchError:
        ds = self.ds
        classes = Counter(label for u in self.units for label in u.index.labels[u.lo : u.hi].tolist())
        full = sum(1 for n in classes.values() if n >= ds.K)
        return CannotBatchError(
            f"loader reader {self.reader} of {self.readers} (rank x loader worker) formed no batch in epoch "
            f"{self.epoch}: its share of the split is {sum(classes.values())} samples of {len(classes)} "
            f"classes, {full} of them with >= {ds.K} images, and a batch needs {ds.P} such classes. Use fewer "
            "ranks or data.loader_workers (larger shares), a smaller data.classes_per_batch or "
            "data.images_per_class, or more data."
        )


def stack_samples(images: list[torch.Tensor]) -> torch.Tensor:
    """Stacked straight into shared memory inside a DataLoader worker (as ``default_collate`` does), so the
    batch is not copied again to cross to the main process."""
    out = None
    if torch.utils.data.get_worker_info() is not None:
        out = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype).share_memory_()
    return torch.stack(images, out=out)
