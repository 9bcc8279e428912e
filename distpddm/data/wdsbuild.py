"""The builder's source for published WebDataset shards indexed in place (`distpddm shards index`): a plan
from the index alone, and a reader that fetches each image by its byte range in the foreign tar.

``distpddm shards build --source wds-index FOREIGN_OUT OUT`` re-chunks every foreign split under
``FOREIGN_OUT`` (or the one split folder given) into the class-chunked layout that training reads. Nothing is
extracted: the plan's source of a sample is ``<shard>/<key>.<ext>@<offset>+<size>`` (the shard's file name, the
sample's key and image field, and where the image member's bytes lie), and :class:`RangeFetcher` reads exactly
those bytes -- ``open``/``seek``/``read`` for a local shard, one ranged GET through fsspec (``cat_file``) for an
http(s) or s3 URL -- retrying transient errors with the training stream's rules (:func:`.retry.retry_after`).
Images are then stored or re-encoded by the builder (:func:`.shards.encode_image`) like any other source's.

Reads are issued in the builder's class-chunked order, ``in_flight`` at once per shard being written (threads:
:meth:`RangeFetcher.prefetch`); the builder's worker processes each write one shard at a time, so at most
``workers x in_flight`` images are held. The plan (one source string and label per sample) is in memory, as
for the other sources; image bytes never are, beyond those in flight.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import StorageUnavailable
from .ranges import read_many_async, read_range, url_to_fs
from .retry import describe_error, is_transient, retry_after
from .sources import SourceError, SourcePlan, SplitPlan
from .wdsindex import INDEX, LAYOUT, etag_of

KIND = "wds-index"
log = logging.getLogger("distpddm.data")
#: Image reads in flight per shard being written (per builder worker process).
IN_FLIGHT = 8


def parse_source(source: str) -> tuple[str, int, int, str]:
    """``<shard>/<key>.<ext>@<offset>+<size>`` -> (shard name, offset, size, ext). A key may hold dots, slashes
    and ``@``: the place is after the last ``@``, the shard name (no slash: a file name) before the first ``/``."""
    head, _, place = source.rpartition("@")
    offset, _, size = place.partition("+")
    shard, _, member = head.partition("/")
    return shard, int(offset), int(size), member.rpartition(".")[2]


class RangeFetcher:
    """The plan's reader: ``fetcher(source) -> (image bytes, ext)``, one ranged read. Picklable (the shard
    table only), so the builder runs it in its worker processes (``in_workers``), where :meth:`prefetch` keeps
    ``in_flight`` reads of a shard's sources going ahead of the writer."""

    in_workers = True

    def __init__(self, urls: dict[str, str], in_flight: int = IN_FLIGHT):
        if in_flight < 1:
            raise ValueError(f"reads in flight must be >= 1, got {in_flight}")
        self.urls, self.in_flight = urls, in_flight

    def __call__(self, source: str, stop: threading.Event | None = None) -> tuple[bytes, str]:
        shard, offset, size, ext = parse_source(source)
        return read_range(self.urls[shard], offset, size, stop), ext

    @contextmanager
    def prefetch(self, sources: list[str], max_bytes: int | None = None) -> Iterator:
        """A reader of ``sources``, to be asked for them in this order: ``in_flight`` reads run ahead of the
        caller (coroutines on the filesystem's event loop where it has one, :func:`.ranges.read_many_async`,
        started a quarter of ``in_flight`` at a time; else threads), so that at most ``in_flight`` reads are
        held, and, with ``max_bytes``, no more bytes than that but for one read. When the caller is done (or
        fails), reads not started are dropped and running ones stop retrying."""
        pool = ThreadPoolExecutor(min(self.in_flight, 32), thread_name_prefix="wds-read")  # local or sync reads
        pending: deque[tuple[str, str, Future, int]] = deque()  # (source, ext, its read, its size)
        upcoming = iter(sources)
        stop = threading.Event()
        batch = max(1, self.in_flight // 4)  # reads started together: one wake-up of the event loop for them
        held = [0]  # bytes of the pending reads
        budget = max_bytes if max_bytes is not None else float("inf")
        low = budget - budget / 4  # ... and reads start again once they hold this little: a few per wake-up

        def top_up() -> None:
            if pending and (self.in_flight - len(pending) < batch or held[0] > low):
                return
            reads, parsed = [], []

            def room() -> bool:  # for one more read: below in_flight and, but for the first, the byte budget
                n = len(pending) + len(parsed)
                return n < self.in_flight and (n == 0 or held[0] < budget)

            while room() and (source := next(upcoming, None)) is not None:
                shard, offset, size, ext = parse_source(source)
                parsed.append((source, ext))
                reads.append((self.urls[shard], offset, size))
                held[0] += size
            if not reads:
                return
            for (source, ext), (url, offset, size), future in zip(
                parsed, reads, read_many_async(reads, stop), strict=True
            ):
                if future is None:  # no event loop (a local file, ftp): a thread of the pool reads it
                    future = pool.submit(read_range, url, offset, size, stop)
                pending.append((source, ext, future, size))

        def read(source: str) -> tuple[bytes, str]:
            top_up()
            expected, ext, future, size = pending.popleft()
            held[0] -= size
            if expected != source:
                raise RuntimeError(f"prefetched {expected!r}, asked for {source!r}: sources read out of order")
            try:
                return future.result(), ext
            finally:
                top_up()

        try:
            yield read
        finally:  # a build stopped part-way (a bad image, ^C): reads not started are dropped, running ones end
            stop.set()
            for _, _, future, _ in pending:
                future.cancel()
            pool.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------------------ the plan


def foreign_splits(folder: Path) -> dict[str, Path]:
    """The split folders (name -> folder) that `distpddm shards index` wrote: ``folder`` itself if it is
    one, else those under it."""
    folder = Path(folder)
    candidates = [folder / INDEX] if (folder / INDEX).exists() else sorted(folder.glob(f"*/{INDEX}"))
    found = {}
    for path in candidates:
        try:
            index = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SourceError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
        if index.get("layout") == LAYOUT:
            found[index.get("split", path.parent.name)] = path.parent
    if not found:
        raise SourceError(
            f"no split indexed in place (a {INDEX} with layout {LAYOUT!r}) in or under {folder}: "
            "run `distpddm shards index SRC FOLDER` first"
        )
    return found


def read_selection(split_dir: Path) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """A foreign split's ``index.json`` and its selection, in the split's order: per sample the shard (its
    number in the index's shard list), the row of that shard's index, and the split's label (int32 arrays)."""
    index = json.loads((Path(split_dir) / INDEX).read_text())
    with np.load(Path(split_dir) / index["selection"]) as sel:
        return index, sel["shard"].astype(np.int32), sel["row"].astype(np.int32), sel["label"].astype(np.int32)


#: Remote shards asked for their size and version at once, when a split is opened.
CHECKS_IN_FLIGHT = 16


def _changed(shard: dict, size: int | None, etag: str | None) -> tuple[str | None, bool]:
    """Why a shard is not what was indexed, else None; and whether that is certain. A size that differs is;
    so is an S3 ETag (the object's content hash); an HTTP ETag is not: servers behind a load balancer or a
    mirror may tag the same file differently (nginx uses the mtime)."""
    if shard.get("bytes") is not None and size is not None and size != shard["bytes"]:
        return f"has {size} bytes, {shard['bytes']} when it was indexed", True
    if shard.get("etag") and etag and etag != shard["etag"]:
        return f"has ETag {etag}, {shard['etag']} when it was indexed", shard["url"].startswith("s3://")
    return None, False


def _stat(url: str) -> tuple[int | None, str | None]:
    """A shard's size and version tag (a local file has no tag), transient errors retried."""
    if "://" not in url:
        return os.stat(url).st_size, None
    fs, path = url_to_fs(url)
    attempt = 0
    while True:
        try:
            info = fs.info(path)
            return info.get("size"), etag_of(info)
        except Exception as e:
            if not retry_after(url, e, attempt):
                raise
            attempt += 1


def shard_urls(split_dir: Path, shards: list[dict]) -> list[str]:
    """A foreign split's shards' URLs, each checked to be the shard that was indexed: the same size, and for a
    remote one the same ETag where its store gives one (asked ``CHECKS_IN_FLIGHT`` at a time). A changed or
    missing shard is a one-line :class:`.sources.SourceError`: its offsets would read the wrong bytes."""

    def check(shard: dict) -> str:
        url = shard["url"]
        try:
            size, etag = _stat(url)
        except Exception as e:  # noqa: BLE001 -- any failure to find the shard is named, in one line
            if is_transient(e, url):  # the store did not answer through the retries: an outage, retried by Ray
                raise StorageUnavailable(f"shard {url} of {split_dir}: {describe_error(e)}") from None
            raise SourceError(f"shard {url} of {split_dir}: {type(e).__name__}: {e}") from None
        why, certain = _changed(shard, size, etag)
        if why is not None and certain:
            raise SourceError(f"shard {url} {why}: index it again (`distpddm shards index`)")
        if why is not None:
            log.warning("shard %s %s: if its bytes changed, index it again (`distpddm shards index`)", url, why)
        return url

    remote = sum("://" in s["url"] for s in shards)
    if remote < 2:
        return [check(s) for s in shards]
    with ThreadPoolExecutor(min(CHECKS_IN_FLIGHT, len(shards)), thread_name_prefix="shard-check") as pool:
        return list(pool.map(check, shards))


def shard_rows(index: dict, shard_of: np.ndarray) -> Iterator[tuple[int, dict, np.ndarray]]:
    """``(shard number, its index.json entry, the selection's samples in it)`` for every shard, in order."""
    order = np.argsort(shard_of, kind="stable")  # the selection's rows, one shard's together
    bounds = np.searchsorted(shard_of[order], np.arange(len(index["shards"]) + 1))
    for s, shard in enumerate(index["shards"]):
        yield s, shard, order[bounds[s] : bounds[s + 1]]


def member_fields(split_dir: Path, shard: dict, rows: np.ndarray, fields: tuple[str, ...]) -> list[np.ndarray]:
    """The arrays ``fields`` of a shard's per-shard index, at ``rows`` (only those members are loaded)."""
    try:
        with np.load((Path(split_dir) / shard["index"]).resolve()) as arrays:
            return [arrays[f][rows] for f in fields]
    except (OSError, KeyError, ValueError, IndexError) as e:
        raise SourceError(f"{split_dir / shard['index']}: unreadable shard index ({type(e).__name__}: {e})") from None


def read_split(split_dir: Path) -> tuple[SplitPlan, dict[str, str], dict]:
    """One foreign split -> its plan (sources, labels, image sizes, class list), the shard table (file name ->
    URL) and its ``index.json``. Shards must still be as they were indexed (:func:`shard_urls`)."""
    index, shard_of, row_of, label_of = read_selection(split_dir)
    urls = {s["name"]: u for s, u in zip(index["shards"], shard_urls(split_dir, index["shards"]), strict=True)}
    sources: list[str] = []
    labels, sizes = [], []
    for _, shard, picked in shard_rows(index, shard_of):
        name = shard["name"]
        if not len(picked):
            continue
        fields = ("keys", "image_exts", "image_offsets", "image_sizes")
        keys, exts, offsets, image_sizes = member_fields(split_dir, shard, row_of[picked], fields)
        sources += [
            f"{name}/{key}.{ext}@{offset}+{size}"
            for key, ext, offset, size in zip(
                keys.tolist(), exts.tolist(), offsets.tolist(), image_sizes.tolist(), strict=True
            )
        ]
        labels.append(label_of[picked])
        sizes.append(image_sizes)
    label_arr = np.concatenate(labels) if labels else np.zeros(0, np.int32)
    size_arr = np.concatenate(sizes).astype(np.int64) if sizes else np.zeros(0, np.int64)
    return SplitPlan(list(index["classes"]), sources, label_arr, size_arr), urls, index


def read_wds_index(folder: Path, in_flight: int = IN_FLIGHT) -> SourcePlan:
    """The plan of every foreign split in or under ``folder`` (see :func:`foreign_splits`), reading them
    through one :class:`RangeFetcher`; the index's carving record is kept."""
    splits: dict[str, SplitPlan] = {}
    urls: dict[str, str] = {}
    carving: dict = {}
    for name, split_dir in foreign_splits(folder).items():
        plan, shard_urls, index = read_split(split_dir)
        for shard, url in shard_urls.items():
            if urls.setdefault(shard, url) != url:
                raise SourceError(f"two shards named {shard!r} in {folder}: {urls[shard]} and {url}")
        if not len(plan):
            raise SourceError(f"split {name!r} of {split_dir} selects no sample")
        splits[name] = plan
        carving = carving or dict(index.get("carving") or {})
    return SourcePlan(KIND, Path(folder).resolve(), splits, RangeFetcher(urls, in_flight), carving)
