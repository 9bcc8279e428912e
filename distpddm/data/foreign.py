"""P x K training batches from a pre-shuffled split indexed in place (`distpddm shards index`, layout "foreign").

Published releases (timm's ``imagenet-12k-wds``) spread every class thinly over every shard, so reading
shards in order rarely gathers K images of P classes. :class:`ForeignPKDataset` reads class-aware instead: one
image member at a time, by its byte range in the foreign tar (:func:`.ranges.read_range`, through
:class:`.wdsbuild.RangeFetcher`: ``open``/``seek``/``read`` locally, one ranged GET over fsspec).

Per epoch, from the seed alone and the same on every rank: each class's samples are permuted and cut into
groups of K (a class's last, short group is left out that epoch), and the groups of all classes are shuffled
and dealt round-robin to the readers (``rank x loader worker``): the readers' groups are disjoint, so no sample
is read twice in an epoch across the job. Each reader fills batches of P groups of distinct classes in the
order its groups come (a group whose class is already in every open batch opens a new one; batches still open
at the epoch's end are left out). The plan is labels only, so the batches are a pure function of (seed, epoch,
reader, readers), and a resumed reader skips to its next batch without reading an image: the position is the
same :class:`.stream.StreamState` the class-chunked stream saves in checkpoints (epoch and batch index per
loader worker). Images of the coming batches are fetched ``in_flight`` at a time (coroutines on fsspec's loop
for a remote shard, threads for a local one), decoded and transformed as :class:`.stream.PKBatchDataset` does;
a sample that does not read or decode is replaced by another image of its class in the batch, and skipped and
counted (:class:`.stream.SkipCounter`).

Memory: the split is held as numpy arrays, sorted by class -- shard number (int32), image offset (int64),
image size (int32) and the sample's position in the split (int32): 20 bytes a sample, 240 MB for 12M samples,
loaded once by the process that builds the dataset and shared copy-on-write with forked loader workers -- and
each reader's epoch plan adds one int32 array of N (the within-class permutation) and its own groups. No
per-sample Python object is kept; image bytes are held only for the reads in flight and the batch being made.
The split folder (its ``index.json``, selection and per-shard indexes) must be local; the shards may be
anywhere fsspec reads.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..dist import env_rank_and_world
from ..errors import CannotBatchError
from .epochs import seed_sequence
from .ranges import RangesIgnored
from .retry import describe_error, is_read_error, is_transient
from .stream import (
    Batch,
    BatchInfo,
    PKStream,
    ShardSet,
    SkipCounter,
    StreamState,
    resolve_shards,
    stack_samples,
)
from .transforms import eval_transform, train_transform
from .wdsbuild import RangeFetcher, member_fields, read_selection, shard_rows, shard_urls

#: Image reads in flight per reader (one loader worker). A reader delivers at most in_flight / round trip images/s
#: (Little's law): at a 50 ms round trip, 32 held one at 420-470 images/s, below its CPU's rate; 64 let it reach
#: 480-500 (bench/remote_stream.py, docs/benchmarks.md). An image in flight holds its bytes only.
IN_FLIGHT = 64
#: Keys looked up at once by the eval reader.
KEY_BLOCK = 1024
#: The eval reader reads a shard's neighbouring images in one request: images at most SPAN_GAP bytes apart (a
#: sample's own small members and tar headers lie between), up to SPAN_BYTES a request. A request costs the
#: reader ~0.6 ms of CPU over HTTP (docs/benchmarks.md), as much as decoding a small image.
SPAN_GAP = 16 * 1024
SPAN_BYTES = 1 << 20
#: ... and holds at most this many bytes in flight (16 reads of whole spans; 64 single images of 256 KiB).
EVAL_BYTES_IN_FLIGHT = 16 << 20


class ForeignSplit:
    """A foreign split's samples as arrays sorted by class (see the module's docstring for their size)."""

    def __init__(self, split_dir: str | Path, rows: bool = False):
        split_dir = Path(split_dir)
        if "://" in str(split_dir) or not split_dir.is_dir():
            raise ValueError(f"{split_dir}: a pre-shuffled split is read from a local split folder")
        index, shard_of, row_of, label_of = read_selection(split_dir)
        n = len(label_of)
        if n >= 2**31:
            raise ValueError(f"{split_dir}: {n} samples; positions are int32")
        offset = np.zeros(n, np.int64)
        size = np.zeros(n, np.int32)
        self.names: list[str] = []
        self.urls: dict[str, str] = {}
        checked = shard_urls(split_dir, index["shards"])
        for s, shard, picked in shard_rows(index, shard_of):
            self.names.append(shard["name"])
            self.urls[shard["name"]] = checked[s]
            if len(picked):
                offset[picked], size[picked] = member_fields(
                    split_dir, shard, row_of[picked], ("image_offsets", "image_sizes")
                )
        self.split_dir, self.shards = split_dir, index["shards"]
        self.classes: list[str] = list(index["classes"])
        order = np.argsort(label_of, kind="stable").astype(np.int32)
        #: each sample's row of its per-shard index (for its key), when asked: 4 bytes a sample more
        self.row = row_of[order] if rows else None
        self.shard, self.offset, self.size, self.position = shard_of[order], offset[order], size[order], order
        self.class_counts = np.bincount(label_of, minlength=len(self.classes)).astype(np.int64)
        self.class_start = np.concatenate([[0], np.cumsum(self.class_counts)]).astype(np.int64)

    @classmethod
    def open(cls, split_dir: str | Path, rows: bool = False) -> ForeignSplit:
        """The split, opened once per process while its index.json stays the same file (inode, size, mtime): the
        trainer's validation passes reuse it, with no HEAD per shard each time, so its shards' sizes and ETags
        are checked at the first pass only (the eval reader's; the training stream opens its split once, and
        keeps no second copy of its arrays here)."""
        path = Path(split_dir)
        try:
            st = (path / "index.json").stat()
        except OSError:
            return cls(split_dir, rows)  # its own one-line error
        return _opened(str(path.resolve()), rows, (st.st_ino, st.st_size, st.st_mtime_ns))

    def __len__(self) -> int:
        return len(self.position)

    def url(self, i: int) -> str:
        """Sample ``i``'s shard's URL."""
        return self.urls[self.names[self.shard[i]]]

    def source(self, i: int, end: int | None = None) -> str:
        """What :class:`.wdsbuild.RangeFetcher` reads for sample ``i``: ``<shard>/<key>.<ext>@<offset>+<size>``
        (the key and ext are not needed to read a range); with ``end``, its shard's bytes from the sample's
        offset to ``end`` (a read of neighbouring images)."""
        size = self.size[i] if end is None else end - self.offset[i]
        return f"{self.names[self.shard[i]]}/s.img@{self.offset[i]}+{size}"


@functools.lru_cache(maxsize=4)
def _opened(split_dir: str, rows: bool, stamp: tuple) -> ForeignSplit:
    return ForeignSplit(split_dir, rows)


def read_bytes(read, source: str, where: str) -> bytes | tuple[str, bool]:
    """``source``'s bytes through a prefetching reader, or why not: (reason, whether the store did not answer).
    Returned, not raised: the caller counts it outside any except block, so an error raised past the skip
    threshold does not carry the raw one (and the URL it names) as context."""
    try:
        return read(source)[0]
    except Exception as e:
        if isinstance(e, RangesIgnored) or not (is_read_error(e) or isinstance(e, ValueError)):
            raise  # a server without ranges fails every read alike: the run stops, in one line
        return f"unreadable ({describe_error(e)})", is_transient(e, where)


def read_image(read, source: str, where: str, transform, counter: SkipCounter) -> torch.Tensor | None:
    """One sample's transformed image through a prefetching reader, or None (skipped and counted, named by
    ``where``) when it does not read or decode; both readers of a foreign split take their images so."""
    raw = read_bytes(read, source, where)
    return decode_image(raw, where, transform, counter)


def decode_image(raw: bytes | tuple[str, bool], where: str, transform, counter: SkipCounter) -> torch.Tensor | None:
    """``transform(raw)``, or None (skipped and counted) when ``raw`` is a failed read's reason or does not decode."""
    if isinstance(raw, tuple):
        counter.skip(where, raw[0], unanswered=raw[1])
        return None
    try:
        img = transform(raw)
    except Exception as e:  # noqa: BLE001 -- any decoder failure is a bad sample
        counter.skip(where, f"image does not decode ({type(e).__name__}: {e})")
        return None
    counter.ok()
    return img


class ForeignPKDataset(PKStream):
    """Endless P x K training batches (:class:`.stream.Batch`) from a foreign split, as
    :class:`.stream.PKBatchDataset` gives them from a class-chunked one (same arguments but the buffer, same
    :class:`.stream.StreamState` for ``start``). ``rank`` / ``world`` default to ``RANK`` / ``WORLD_SIZE``."""

    def __init__(
        self,
        shards: ShardSet | str | Path,
        classes_per_batch: int,
        images_per_class: int,
        image_size: int = 224,
        max_skip_rate: float = 0.01,
        seed: int = 0,
        transform: Callable[[bytes, random.Random], torch.Tensor] | None = None,
        start: StreamState | None = None,
        in_flight: int = IN_FLIGHT,
    ):
        super().__init__()
        shard_set = shards if isinstance(shards, ShardSet) else resolve_shards(shards)
        if not shard_set.foreign:
            raise ValueError(f"{shards}: not a split that `distpddm shards index` wrote; use PKBatchDataset")
        self.check_batch_args(classes_per_batch, images_per_class, seed)
        self.split = ForeignSplit(shard_set.split_dir)
        self.split_digest = shard_set.digest
        self.P, self.K = classes_per_batch, images_per_class
        full = int((self.split.class_counts >= self.K).sum())
        if full < self.P:
            raise ValueError(
                f"{shard_set.split_dir}: only {full} classes have >= {self.K} images, and a batch needs {self.P}"
            )
        self.max_skip_rate, self.seed, self.start, self.in_flight = max_skip_rate, seed, start, in_flight
        self.transform = transform or train_transform(image_size)

    def layout(self, world: int, workers: int) -> dict:
        """What a saved position is valid for."""
        return {
            "world": world,
            "workers": workers,
            "P": self.P,
            "K": self.K,
            "reads": "foreign",
            "seed": self.seed,
            "split": self.split_digest,
        }

    def _epoch(self, epoch: int, reader: int, readers: int, worker: int, counter, skip: int) -> Iterator[Batch]:
        return EpochPlan(self, epoch, reader, readers, worker).run(skip, counter)


class EpochPlan:
    """One reader's batches of one epoch: ``batches[i]`` are the split's class-sorted indexes of batch ``i``'s
    P x K samples, classes contiguous."""

    def __init__(self, ds: ForeignPKDataset, epoch: int, reader: int, readers: int, worker: int):
        if not 0 <= reader < readers:
            raise ValueError(f"reader {reader} outside 0..{readers - 1}")
        self.ds, self.epoch, self.reader, self.readers, self.worker = ds, epoch, reader, readers, worker
        split, K = ds.split, ds.K
        rng = np.random.default_rng(seed_sequence(ds.seed, epoch, 3))  # the same on every reader
        ids = np.arange(len(split), dtype=np.int32)
        starts, counts = split.class_start, split.class_counts
        for c in np.flatnonzero(counts >= K).tolist():  # each class's samples permuted in place
            rng.shuffle(ids[starts[c] : starts[c + 1]])
        per_class = counts // K
        group_class = np.repeat(np.arange(len(counts)), per_class)
        first_group = np.cumsum(per_class) - per_class
        group_start = starts[group_class] + K * (np.arange(len(group_class)) - first_group[group_class])
        mine = rng.permutation(len(group_class))[reader::readers]  # dealt: disjoint between readers
        batches = _fill(group_class[mine].tolist(), ds.P)
        picks = group_start[mine][np.asarray(batches, dtype=np.int64).reshape(-1, ds.P)]  # (B, P) group starts
        self.batches = ids[picks[:, :, None] + np.arange(K)].reshape(len(picks), ds.P * K)

    def run(self, skip: int, counter: SkipCounter) -> Iterator[Batch]:
        """Batches ``skip``, ``skip + 1``, ... of this epoch; the ones before are not read."""
        ds, split = self.ds, self.ds.split
        if not len(self.batches):
            raise self._cannot_batch()
        counter.seen += min(skip, len(self.batches)) * ds.P * ds.K  # read before a resume: the rate's denominator
        todo = self.batches[skip:]
        fetcher = RangeFetcher(split.urls, ds.in_flight)
        with fetcher.prefetch(split.source(int(i)) for i in todo.flat) as read:  # lazily: no list of N
            for index, row in enumerate(todo, start=skip):
                samples, rng = row.tolist(), self._rng(index)
                # each image decoded as soon as it is read: the next ``in_flight`` reads run meanwhile
                images = [self._image(i, read, rng, counter) for i in samples]
                batch = self._make(index, samples, images)
                if batch is not None:
                    yield batch

    def _rng(self, index: int) -> random.Random:
        ds = self.ds
        return random.Random(
            int(seed_sequence(ds.seed, self.epoch, self.reader, self.readers, 2, index).generate_state(1)[0])
        )

    def _image(self, i: int, read, rng: random.Random, counter: SkipCounter) -> torch.Tensor | None:
        split = self.ds.split
        where = f"{split.url(i)}@{split.offset[i]} (sample {split.position[i]})"
        return read_image(read, split.source(i), where, lambda raw: self.ds.transform(raw, rng), counter)

    def _make(self, index: int, samples: list[int], images: list[torch.Tensor | None]) -> Batch | None:
        ds, split = self.ds, self.ds.split
        labels = np.searchsorted(split.class_start, samples, side="right") - 1
        keys = [int(split.position[i]) if img is not None else -1 for i, img in zip(samples, images, strict=True)]
        for n, img in enumerate(images):
            if img is None:  # keep the P x K shape: reuse another image of the same class
                group = n - n % ds.K
                same = [x for x in images[group : group + ds.K] if x is not None]
                if not same:
                    return None
                images[n] = same[n % len(same)]
        done = (index + 1) * ds.P * ds.K
        info = BatchInfo(self.worker, self.epoch, index, done, done, 0)
        return Batch(stack_samples(images), torch.from_numpy(labels.astype(np.int64)), torch.tensor(keys), info)

    def _cannot_batch(self) -> CannotBatchError:
        ds = self.ds
        full = int((ds.split.class_counts >= ds.K).sum())
        return CannotBatchError(
            f"loader reader {self.reader} of {self.readers} (rank x loader worker) formed no batch in epoch "
            f"{self.epoch}: the split's {len(ds.split)} samples make groups of {ds.K} in {full} classes, dealt "
            f"to {self.readers} readers, and a batch needs {ds.P} groups of distinct classes. Use fewer ranks "
            "or data.loader_workers, a smaller data.classes_per_batch or data.images_per_class, or more data."
        )


def _fill(classes: list[int], P: int) -> list[int]:
    """Batches of ``P`` distinct classes from groups of the given classes, in order: each group goes to the
    first open batch without its class (else opens one); a batch is done when full. The groups' indexes in
    ``classes``, batch after batch, in the order the batches were completed; open batches are left out."""
    open_batches: list[tuple[list[int], set[int]]] = []
    done: list[int] = []
    for g, c in enumerate(classes):
        for n, (members, seen) in enumerate(open_batches):
            if c not in seen:
                members.append(g)
                seen.add(c)
                if len(members) == P:
                    done += members
                    del open_batches[n]
                break
        else:
            open_batches.append(([g], {c}))
    return done


def spans(
    shard: np.ndarray, offset: np.ndarray, size: np.ndarray, gap: int = SPAN_GAP, most: int = SPAN_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """The ranged reads that cover samples in shard and offset order: ``(starts, ends)``, read ``r`` covering
    samples ``starts[r]`` to ``starts[r + 1] - 1``, from the first one's offset to byte ``ends[r]`` (the
    furthest end among them). A sample starts a read when it is in another shard than the one before, more than
    ``gap`` bytes past the read's end, or would take the read past ``most`` bytes (a larger one is read alone)."""
    starts: list[int] = []
    ends: list[int] = []
    first = reach = prev = 0
    for j, (s, off, end) in enumerate(zip(shard.tolist(), offset.tolist(), (offset + size).tolist(), strict=True)):
        if j == 0 or s != prev or off - reach > gap or max(reach, end) - first > most:
            if j:
                ends.append(reach)
            starts.append(j)
            first, reach, prev = off, end, s
        else:
            reach = max(reach, end)
    if starts:
        ends.append(reach)
    return np.asarray(starts, np.int64), np.asarray(ends, np.int64)


class ForeignEvalDataset(torch.utils.data.IterableDataset):
    """Every sample of a foreign split once, as :class:`.evalset.EvalDataset` yields a built split's:
    ``(image uint8 (3, S, S), label, position in the split, key)``. The samples are read in shard and offset
    order, each reader (rank x loader worker) a contiguous run of that order, neighbouring images together by
    one range read (:func:`spans`), ``in_flight`` reads at once, each image decoded as it is taken. ``limit``
    reads only the samples at split positions below it."""

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
        in_flight: int = IN_FLIGHT,
        span_bytes: int = SPAN_BYTES,
    ):
        super().__init__()
        shard_set = shards if isinstance(shards, ShardSet) else resolve_shards(shards)
        if not shard_set.foreign:
            raise ValueError(f"{shards}: not a split that `distpddm shards index` wrote; use EvalDataset")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {limit}")
        if span_bytes < 1:
            raise ValueError(f"span_bytes must be >= 1, got {span_bytes}")
        self.split = ForeignSplit.open(shard_set.split_dir, rows=True)
        split = self.split
        chosen = np.flatnonzero(split.position < limit) if limit is not None else np.arange(len(split))
        self.order = chosen[np.lexsort((split.offset[chosen], split.shard[chosen]))].astype(np.int64)
        self.max_skip_rate, self.rank, self.world, self.in_flight = max_skip_rate, rank, world, in_flight
        self.span_bytes = span_bytes
        self.transform = transform or eval_transform(image_size)

    @property
    def samples(self) -> int:
        return len(self.order)

    def keys(self, ids: np.ndarray) -> list[str]:
        """The samples' keys, from their per-shard indexes (only the rows asked for are kept)."""
        split, out = self.split, [""] * len(ids)
        shard_of = split.shard[ids]
        for s in np.unique(shard_of).tolist():
            where = np.flatnonzero(shard_of == s)
            (keys,) = member_fields(split.split_dir, split.shards[s], split.row[ids[where]], ("keys",))
            for n, k in zip(where.tolist(), keys.tolist(), strict=True):
                out[n] = str(k)
        return out

    def __iter__(self):
        rank, world = env_rank_and_world() if self.rank is None else (self.rank, self.world or 1)
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        readers, reader = world * workers, rank * workers + worker
        mine = self.order[len(self.order) * reader // readers : len(self.order) * (reader + 1) // readers]
        split, counter = self.split, SkipCounter(self.max_skip_rate)
        labels = np.searchsorted(split.class_start, mine, side="right") - 1
        starts, ends = spans(split.shard[mine], split.offset[mine], split.size[mine], most=self.span_bytes)
        sources = [split.source(i, end) for i, end in zip(mine[starts].tolist(), ends.tolist(), strict=True)]
        images = np.diff(np.append(starts, len(mine))).tolist()  # per read
        read_no, raw, first = 0, b"", 0  # the current read's bytes (or why it failed) and its first byte's offset
        single = RangeFetcher(split.urls)  # a failed read's images, one at a time
        with RangeFetcher(split.urls, self.in_flight).prefetch(sources, EVAL_BYTES_IN_FLIGHT) as read:
            for start in range(0, len(mine), KEY_BLOCK):  # keys a block at a time: no list of every key held
                block = mine[start : start + KEY_BLOCK]
                labs = labels[start : start + KEY_BLOCK].tolist()
                for n, (i, label, key) in enumerate(zip(block.tolist(), labs, self.keys(block), strict=True)):
                    where = f"{split.url(i)}@{split.offset[i]} ({key})"
                    if read_no < len(starts) and start + n == starts[read_no]:
                        raw, first = read_bytes(read, sources[read_no], where), int(split.offset[i])
                        if isinstance(raw, tuple) and images[read_no] > 1:
                            raw = None  # each of its images read alone: one bad range costs one image
                        read_no += 1
                    if raw is None:
                        piece = read_bytes(single, split.source(i), where)
                        if isinstance(piece, tuple) and piece[1]:  # the store does not answer: the rest alike
                            raw = piece
                    elif isinstance(raw, tuple):
                        piece = raw
                    else:
                        at = int(split.offset[i]) - first
                        piece = raw[at : at + int(split.size[i])]
                    img = decode_image(piece, where, self.transform, counter)
                    if img is not None:
                        yield img, label, int(split.position[i]), key

    def raw(self, positions) -> list[bytes | None]:
        """The encoded images at these split positions (None where unreadable): for reports, a few dozen."""
        from .ranges import read_range

        split = self.split
        where = np.argsort(split.position)
        out: list[bytes | None] = []
        for p in np.asarray(positions, dtype=np.int64).tolist():
            i = int(where[p])
            try:
                out.append(read_range(split.url(i), int(split.offset[i]), int(split.size[i])))
            except Exception:  # noqa: BLE001 -- an illustration: the report marks it missing
                out.append(None)
        return out
