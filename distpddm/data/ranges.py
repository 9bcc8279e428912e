"""Byte ranges of shards, local or behind any fsspec URL: one range at a time (:func:`read_range`, the
pre-shuffled reader's single images) or a shard's run of samples read ahead (:class:`ReadAhead`, the
class-chunked readers').

A remote store is far away: a request costs a round trip (tens of ms to an object store) before its first
byte, so a reader that asks for the next block only when it needs it waits a round trip per block. ReadAhead
cuts the bytes the caller will read into parts and keeps ``depth`` ranged GETs of them in flight; it fetches
only those bytes (no block past the end of a run), and holds at most ``depth`` parts.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from ..errors import DeterministicError
from .retry import retry_after, retry_after_async

#: Read-ahead of a run of samples: bytes per ranged GET, and GETs in flight (so ~8 MiB held per open run; a
#: class-chunked reader holds two: stream._NextRange opens the next range while one is read).
PART_BYTES = 1 << 20
DEPTH = 8


class RangesIgnored(DeterministicError):
    """The server sends whole files for range requests: reading one image would download its shard."""


def _ranges_ignored(url: str) -> RangesIgnored:
    return RangesIgnored(
        f"{url}: the server ignores HTTP range requests (each image would download its whole shard): serve the "
        "shards from one that honours Range, or build a local class-chunked copy"
    )


def read_full(f, n: int) -> bytes:
    """``n`` bytes, or fewer only at the end of the file (a stream or a raw file may return less per read)."""
    parts = []
    while n > 0:
        chunk = f.read(n)
        if not chunk:
            break
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _read_local(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        return read_full(f, size)


#: HTTP folders (a shard URL less its file name) seen answering a range request with a range: later reads from
#: them skip the check (an ``HTTPFile`` per read costs ~0.2 ms more CPU than ``cat_file``; docs/benchmarks.md).
_RANGES_HONOURED: set[str] = set()


_FILESYSTEMS: dict[str, tuple] = {}
_FILESYSTEMS_PID = [0]
_SHARED: dict[str, object] = {}  # one filesystem per class and options: see url_to_fs
_INHERITED: list = []


def _filesystem_classes(cls) -> list:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _filesystem_classes(sub)
    return out


_SNAPSHOT: list = []


def _snapshot() -> None:
    """Before a fork, in the parent: the fsspec filesystems the child will copy (taken here, as fsspec's own
    fork hook empties its instance caches in the child before any later-registered hook of ours runs)."""
    _SNAPSHOT[:] = [*_FILESYSTEMS.values(), *_SHARED.values()]
    fsspec = sys.modules.get("fsspec")
    if fsspec is not None:
        for cls in _filesystem_classes(fsspec.AbstractFileSystem):
            _SNAPSHOT.extend(getattr(cls, "_cache", {}).values())


def _keep_inherited() -> None:
    """In a forked child (a DataLoader worker): hold on to the fsspec filesystems copied from the parent. Once
    unreachable, a copy's finalizer would close its pooled connections, and with them remove the parent's
    sockets from the epoll instance that parent and child share: the parent's next request on one of them
    (a validation pass after the loader workers started) would then wait forever. Forked workers end with
    ``os._exit``, so the copies are never closed."""
    _INHERITED.extend(_SNAPSHOT)
    _SNAPSHOT.clear()


os.register_at_fork(before=_snapshot, after_in_parent=_SNAPSHOT.clear, after_in_child=_keep_inherited)


#: Connections an S3 filesystem of the readers may hold: aiobotocore's default, 10, is below one pre-shuffled
#: reader's 64 reads in flight (foreign.IN_FLIGHT), and would cap it at 10 reads a round trip.
S3_CONNECTIONS = 64


def _options(url: str) -> dict:
    """Storage options the readers add to the user's (fsspec's config): a connection pool for S3 as deep as the
    reads they keep in flight, unless the user's config sets one."""
    if url.split("://", 1)[0] not in ("s3", "s3a"):
        return {}
    import fsspec.config

    config = dict(fsspec.config.conf.get("s3", {}).get("config_kwargs", {}))
    config.setdefault("max_pool_connections", S3_CONNECTIONS)
    return {"config_kwargs": config}


def url_to_fs(url: str) -> tuple:
    """``fsspec.core.url_to_fs``, remembered per URL in this process (parsing it again costs ~0.1 ms a read);
    forgotten in a forked child, as fsspec forgets its filesystems (their sessions belong to the parent). One
    async filesystem (HTTP, S3) per class and options serves every thread: fsspec releases before its PR #2028
    keep one per thread, and a reader's threads would each open a session and its connections."""
    if _FILESYSTEMS_PID[0] != os.getpid() or len(_FILESYSTEMS) > 100_000:
        _FILESYSTEMS.clear()
        _SHARED.clear()
        _FILESYSTEMS_PID[0] = os.getpid()
    found = _FILESYSTEMS.get(url)
    if found is None:
        import fsspec
        from fsspec.utils import tokenize

        fs, path = fsspec.core.url_to_fs(url, **_options(url))
        if getattr(fs, "async_impl", False):  # one session for all threads; a sync one (ftp) may not be shared
            fs = _SHARED.setdefault(tokenize(type(fs), fs.storage_args, fs.storage_options), fs)
        found = _FILESYSTEMS[url] = (fs, path)
    return found


def _read_remote(url: str, offset: int, size: int) -> bytes:
    """One ranged GET (no HEAD); more bytes than asked only from a store that ignores ranges."""
    fs, path = url_to_fs(url)
    if "http" in fs.protocol:
        folder = url.rsplit("/", 1)[0]
        if folder not in _RANGES_HONOURED:  # fsspec's HTTPFile refuses a response that is no range before its body
            try:  # size: a lower bound of the file's, so that opening costs no HEAD request
                with fs.open(path, "rb", block_size=size, cache_type="none", size=offset + size) as f:
                    f.seek(offset)
                    data = read_full(f, size)
            except ValueError as e:
                if "range requests" in str(e):
                    raise _ranges_ignored(url) from None
                raise
            if offset > 0:  # at offset 0 fsspec takes a whole-file 200 as an answer: no proof of ranges
                _RANGES_HONOURED.add(folder)
            return data
        from fsspec.asyn import sync

        return sync(fs.loop, _cat_range, fs, path, url, offset, size)
    return fs.cat_file(path, start=offset, end=offset + size)


async def _cat_range(fs, path: str, url: str, offset: int, size: int) -> bytes:
    """One ranged GET on an async filesystem. Over HTTP the answer's status is looked at before its body: one
    file that ignores ranges in a folder whose others honoured them is refused without downloading it."""
    if "http" not in fs.protocol or size <= 0:
        return await fs._cat_file(path, start=offset, end=offset + size)
    kw = fs.kwargs.copy()  # what fsspec's own _cat_file sends: the user's client_kwargs, auth, headers
    headers = dict(kw.pop("headers", None) or {})
    headers["Range"] = f"bytes={offset}-{offset + size - 1}"
    session = await fs.set_session()
    async with session.get(getattr(fs, "encode_url", str)(path), headers=headers, **kw) as r:
        if r.status == 200 and (r.content_length is None or r.content_length > size):
            raise _ranges_ignored(url)  # leaving the block unread closes the connection: no body is fetched
        fs._raise_not_found_for_status(r, path)
        return await r.read()


def fetch(url: str, offset: int, size: int) -> bytes:
    """Up to ``size`` bytes at ``offset`` (fewer at the end of the file), no retry: the caller's policy
    applies. :class:`RangesIgnored` when a server sends more than asked."""
    data = _read_remote(url, offset, size) if "://" in url else _read_local(url, offset, size)
    if len(data) > size:
        raise _ranges_ignored(url)
    return data


def read_range(url: str, offset: int, size: int, stop: threading.Event | None = None) -> bytes:
    """``size`` bytes at ``offset`` of a local file or an fsspec URL, transient errors retried (:mod:`.retry`;
    ``stop``, once set, ends the retries).
    :class:`RangesIgnored` from a server that sends more than asked; ``ValueError`` when the shard is shorter
    than the index says (it changed since it was indexed)."""
    attempt = 0
    while True:
        try:
            data = fetch(url, offset, size)
            break
        except Exception as e:
            if not retry_after(url, e, attempt, stop):
                raise
            attempt += 1
    return _checked(url, offset, size, data)


def read_async(url: str, offset: int, size: int, stop: threading.Event) -> Future | None:
    """:func:`read_range`, started as a coroutine on the event loop of the URL's async fsspec filesystem (HTTP
    once its folder has honoured a range, S3), with no thread blocked on it: half the client CPU per read of a
    thread waiting in fsspec's sync wrapper (bench/range_reads_cpu.py). None for other URLs."""
    return read_many_async([(url, offset, size)], stop)[0]


def read_many_async(reads: list[tuple[str, int, int]], stop: threading.Event) -> list[Future | None]:
    """:func:`read_async` of each ``(url, offset, size)``, the coroutines handed to their event loop in one
    call: each hand-over wakes the loop's thread, which then holds the GIL while the caller waits for it
    (a reader that started its reads one at a time spent ~0.3 ms of its decoding thread's time per image
    so, over HTTP from nginx on loopback)."""
    out: list[Future | None] = []
    starts: dict[object, list] = {}  # event loop -> [(coroutine, its future)]
    for url, offset, size in reads:
        future: Future = Future()
        try:
            made = _coroutine(url, offset, size, stop)
        except Exception as e:  # noqa: BLE001 -- this read's (a URL fsspec cannot open): raised by its result()
            future.set_exception(e)
            out.append(future)
            continue
        if made is not None:
            starts.setdefault(made[1], []).append((made[0], future))
        out.append(future if made is not None else None)
    for loop, batch in starts.items():
        try:
            loop.call_soon_threadsafe(_start, loop, batch)
        except Exception as e:  # noqa: BLE001 -- a closed loop: each read of the batch fails alone, in order
            for coro, future in batch:
                coro.close()
                future.set_exception(e)
    return out


def _coroutine(url: str, offset: int, size: int, stop: threading.Event) -> tuple | None:
    """(the read's coroutine, its filesystem's event loop), or None where it has none."""
    if "://" not in url:
        return None
    fs, path = url_to_fs(url)
    if not getattr(fs, "async_impl", False) or (
        "http" in fs.protocol and url.rsplit("/", 1)[0] not in _RANGES_HONOURED
    ):
        return None
    return _read_range_async(fs, path, url, offset, size, stop), fs.loop


def _start(loop, batch: list) -> None:
    """On the loop: a task per coroutine, its outcome copied to its future; cancelling the future cancels the
    task (one cancelled before its task started never starts), as with ``asyncio.run_coroutine_threadsafe``."""
    for coro, future in batch:
        if future.cancelled():
            coro.close()
            future.set_running_or_notify_cancel()  # waiters (concurrent.futures.wait) see it done
            continue
        try:
            task = loop.create_task(coro)
        except BaseException as e:  # noqa: BLE001 -- no future of the batch may be left pending
            coro.close()
            if future.set_running_or_notify_cancel():
                future.set_exception(e)
            continue
        task.add_done_callback(lambda task, future=future: _settle(task, future))
        future.add_done_callback(lambda future, task=task: _cancel(loop, task, future))


def _cancel(loop, task: asyncio.Task, future: Future) -> None:
    """A future's callback, in the thread that settled or cancelled it: a cancelled one's task is cancelled."""
    if future.cancelled():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing runs on it any more
            loop.call_soon_threadsafe(task.cancel)


def _settle(task: asyncio.Task, future: Future) -> None:
    if task.cancelled():
        future.cancel()
        future.set_running_or_notify_cancel()
    elif future.set_running_or_notify_cancel():  # False: cancelled meanwhile, by its reader
        if task.exception() is not None:
            future.set_exception(task.exception())
        else:
            future.set_result(task.result())


async def _read_range_async(fs, path: str, url: str, offset: int, size: int, stop: threading.Event) -> bytes:
    attempt = 0
    while True:
        try:
            data = await _cat_range(fs, path, url, offset, size)
            break
        except Exception as e:
            if not await retry_after_async(url, e, attempt, stop):
                raise
            attempt += 1
    return _checked(url, offset, size, data)


def _checked(url: str, offset: int, size: int, data: bytes) -> bytes:
    if len(data) > size:
        raise _ranges_ignored(url)
    if len(data) < size:
        raise ValueError(
            f"{url}: {len(data)} bytes at {offset}, the index says {size}: the shard is shorter than when it was "
            "indexed; index it again (`distpddm shards index`)"
        )
    return data


class ReadAhead:
    """A read-only file over the byte ``spans`` ([start, end) pairs, ascending, disjoint) of a remote shard, for
    a reader that seeks to a span and reads on: ``depth`` parts of at most ``part`` bytes are fetched ahead of
    the position, in threads. A read outside the spans is one direct fetch. Errors (a failed GET) are raised by
    the ``read`` that needs the part, and the part is fetched again on the next read: retrying is the caller's."""

    def __init__(self, url: str, spans: list[tuple[int, int]], part: int = PART_BYTES, depth: int = DEPTH):
        if part < 1 or depth < 1:
            raise ValueError(f"part and depth must be >= 1, got {part}, {depth}")
        self.url, self.depth = url, depth
        self.parts: list[tuple[int, int]] = [
            (a, min(a + part, end)) for start, end in spans for a in range(start, end, part)
        ]
        self._starts = [a for a, _ in self.parts]
        self._pool = ThreadPoolExecutor(depth, thread_name_prefix="read-ahead")
        self._futures: dict[int, Future] = {}
        self.pos = self.parts[0][0] if self.parts else 0

    def _part_at(self, pos: int) -> int | None:
        k = bisect.bisect_right(self._starts, pos) - 1
        return k if k >= 0 and pos < self.parts[k][1] else None

    def _get(self, k: int) -> bytes:
        for j in [j for j in self._futures if j < k or j >= k + self.depth]:  # behind us, or a seek away
            self._futures.pop(j).cancel()
        for j in range(k, min(k + self.depth, len(self.parts))):
            if j not in self._futures:
                a, b = self.parts[j]
                self._futures[j] = self._pool.submit(fetch, self.url, a, b - a)
        try:
            return self._futures[k].result()
        except BaseException:
            self._futures.pop(k, None)  # asked again, fetched again
            raise

    def start(self) -> ReadAhead:
        """Send the first ``depth`` parts' GETs now, before any read (a reader that knows what it reads next)."""
        for j in range(min(self.depth, len(self.parts))):
            if j not in self._futures:
                a, b = self.parts[j]
                self._futures[j] = self._pool.submit(fetch, self.url, a, b - a)
        return self

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0:
            raise ValueError("ReadAhead seeks to absolute positions only")
        self.pos = pos
        return pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int) -> bytes:
        out = []
        while n > 0:
            k = self._part_at(self.pos)
            if k is None:
                data = fetch(self.url, self.pos, n)
                out.append(data)
                self.pos += len(data)
                break
            a, b = self.parts[k]
            data = self._get(k)
            piece = data[self.pos - a : self.pos - a + n]
            out.append(piece)
            self.pos += len(piece)
            n -= len(piece)
            if len(data) < b - a and self.pos >= a + len(data):  # the file ends inside this part
                break
        return b"".join(out)

    def close(self) -> None:
        for f in self._futures.values():
            f.cancel()
        self._futures.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
