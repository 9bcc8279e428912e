"""Which read errors of a shard, its index or a checkpoint may pass on a retry, and the one backoff every
reader uses (the class-chunked stream, the eval reader, the in-place indexer and the ranged image reads):
waits of ``RETRY_BASE_S`` doubled at each of ``READ_RETRIES`` retries. Module constants, so that tests can make
them small."""

from __future__ import annotations

import asyncio
import errno
import logging
import sys
import threading
import time
from collections.abc import Iterator

from ..redact import redact

log = logging.getLogger("distpddm.data")


#: How often a read error that may pass is retried before its samples are counted as skipped, and the first
#: wait (doubled at every retry: 0.5, 1, 2, 4, 8 s; 15.5 s in all, past a store's usual 503 burst -- the fault
#: bench's server answers 503 for 10 s). Module constants, so that tests can make them small.
READ_RETRIES = 5
RETRY_BASE_S = 0.5
#: OSErrors that say the file is not there or not ours to read: a retry would find the same (as would one with
#: errno EINVAL, see :func:`is_transient`).
PERSISTENT_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_sleep = time.sleep  # tests replace them
_sleep_async = asyncio.sleep


def _aiohttp():
    """aiohttp, if something (fsspec's HTTP filesystem) imported it: else none of its errors can be raised."""
    return sys.modules.get("aiohttp")


def _http_error(error: BaseException) -> bool:
    """An error of aiohttp's client or an asyncio timeout: fsspec's HTTP filesystem raises them as they are,
    and most are no ``OSError``."""
    aiohttp = _aiohttp()
    return isinstance(error, asyncio.TimeoutError) or (aiohttp is not None and isinstance(error, aiohttp.ClientError))


def _transient_http(error: BaseException) -> bool:
    """A server's or connection's failure, not the request's: 5xx or 429, a reset or dropped connection, a
    truncated body, a timeout. A 404 or 403, a bad URL, a bad certificate are not."""
    aiohttp = _aiohttp()
    if aiohttp is not None and isinstance(error, aiohttp.ClientError):
        if isinstance(error, aiohttp.ClientResponseError):
            return error.status >= 500 or error.status == 429
        if isinstance(error, (aiohttp.ClientSSLError, aiohttp.ServerFingerprintMismatch)):
            return False
        return isinstance(error, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError))
    return isinstance(error, (asyncio.TimeoutError, TimeoutError, ConnectionError))


def _causes(error: BaseException) -> Iterator[BaseException]:
    """What ``error`` was raised from or while handling, nearest first (a bounded walk: chains can loop)."""
    seen = error.__cause__ or error.__context__
    for _ in range(8):
        if seen is None:
            return
        yield seen
        seen = seen.__cause__ or seen.__context__


def is_transient(error: BaseException, url: str) -> bool:
    """May a retry of this read error of ``url`` succeed? An ``OSError`` but the persistent ones; an HTTP error
    of :func:`_transient_http`; and, for a remote URL, a ``FileNotFoundError`` raised from one: fsspec's HTTP
    filesystem reports a 503 to a file's HEAD and GET so (a real 404 is raised from the 404, and not retried)."""
    aiohttp = _aiohttp()
    if aiohttp is not None and isinstance(error, aiohttp.ClientError):
        return _transient_http(error)
    if isinstance(error, FileNotFoundError):
        remote = "://" in url and not url.startswith("file://")
        return remote and any(_transient_http(e) for e in _causes(error))
    if isinstance(error, OSError):  # EINVAL: s3fs's name for a request the store refused (a 416, a 400, a 412)
        return not isinstance(error, PERSISTENT_ERRORS) and error.errno != errno.EINVAL
    return isinstance(error, asyncio.TimeoutError)  # no OSError before Python 3.11


def is_read_error(error: BaseException) -> bool:
    """An error of reading a shard or its index (then counted as skipped when it stays), not a bug's."""
    return isinstance(error, OSError) or _http_error(error)


def describe_error(error: BaseException) -> str:
    """``Type: message``, and the HTTP error behind it (fsspec's ``FileNotFoundError`` names only the URL);
    redacted: these lines reach exceptions that Ray prints unfiltered, and a URL may be presigned."""
    text = f"{type(error).__name__}: {error}"
    cause = next((e for e in _causes(error) if _http_error(e)), None)
    return redact(text if cause is None else f"{text}, from {type(cause).__name__}: {cause}")


def retry_delay(where: str, error: BaseException, attempt: int, stop: threading.Event | None = None) -> float | None:
    """The wait before retry ``attempt + 1`` of a read error of ``where`` (a URL; logged once, naming it and the
    error); None when the error does not pass (:func:`is_transient`), the retries are spent or ``stop`` is set."""
    if not is_transient(error, where) or attempt >= READ_RETRIES or (stop is not None and stop.is_set()):
        return None
    delay = RETRY_BASE_S * 2**attempt
    log.warning("%s: %s; retry %d of %d in %.1f s", where, describe_error(error), attempt + 1, READ_RETRIES, delay)
    return delay


def retry_after(where: str, error: BaseException, attempt: int, stop: threading.Event | None = None) -> bool:
    """Wait before retry ``attempt + 1`` (:func:`retry_delay`); False, without waiting, when there is none.
    ``stop`` (a read ahead of a consumer that has gone): set, it ends the wait, and False says not to retry."""
    delay = retry_delay(where, error, attempt, stop)
    if delay is None:
        return False
    if stop is None:
        _sleep(delay)
        return True
    return not stop.wait(delay)


async def retry_after_async(
    where: str, error: BaseException, attempt: int, stop: threading.Event | None = None
) -> bool:
    """:func:`retry_after` in a coroutine: the wait is the event loop's, holding no thread (cancelling the task
    ends it at once; ``stop`` is looked at when it ends)."""
    delay = retry_delay(where, error, attempt, stop)
    if delay is None:
        return False
    await _sleep_async(delay)
    return stop is None or not stop.is_set()
