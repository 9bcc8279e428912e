"""Byte ranges of shards (distpddm/data/ranges.py): ReadAhead gives exactly a plain file's bytes, fetches only
the spans asked for, keeps several parts in flight, and leaves retrying to its caller."""

import asyncio
import threading
import time

import pytest

from distpddm.data import ranges
from distpddm.data.ranges import RangesIgnored, ReadAhead, fetch


@pytest.fixture
def blob(tmp_path):
    data = bytes(range(256)) * 40  # 10,240 bytes
    path = tmp_path / "shard.tar"
    path.write_bytes(data)
    return str(path), data


def _spy(monkeypatch, delay=0.0):
    """Records every fetch (offset, size) and the most fetches running at once."""
    calls, lock, state = [], threading.Lock(), {"now": 0, "most": 0}
    real = ranges.fetch

    def spy(url, offset, size):
        with lock:
            calls.append((offset, size))
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        try:
            time.sleep(delay)
            return real(url, offset, size)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(ranges, "fetch", spy)
    return calls, state


def test_reads_equal_a_plain_file_across_parts_and_spans(blob, monkeypatch):
    path, data = blob
    calls, _ = _spy(monkeypatch)
    spans = [(100, 2100), (3000, 3001), (5000, 10240)]
    with ReadAhead(path, spans, part=700, depth=3) as f:
        f.seek(100)
        assert f.read(1500) == data[100:1600] and f.tell() == 1600
        assert f.read(500) == data[1600:2100]
        f.seek(3000)
        assert f.read(1) == data[3000:3001]
        f.seek(5000)
        got = b"".join(f.read(min(333, 10240 - f.tell())) for _ in range(16))  # a reader stops at the span's end
    assert got == data[5000:]
    inside = [(o, s) for o, s in calls if any(a <= o and o + s <= b for a, b in spans)]
    assert inside == sorted(set(inside))  # each part fetched once, none outside the spans
    assert sum(s for _, s in calls) == sum(b - a for a, b in spans)
    assert max(s for _, s in calls) <= 700


def test_parts_are_fetched_ahead_in_flight(blob, monkeypatch):
    path, data = blob
    _, state = _spy(monkeypatch, delay=0.05)
    with ReadAhead(path, [(0, len(data))], part=1024, depth=4) as f:
        assert f.read(len(data)) == data
    assert state["most"] == 4


def test_a_read_outside_the_spans_and_past_the_end(blob, monkeypatch):
    path, data = blob
    calls, _ = _spy(monkeypatch)
    with ReadAhead(path, [(0, 100)], part=64) as f:
        f.seek(9000)
        assert f.read(50) == data[9000:9050] and calls[-1] == (9000, 50)  # one direct fetch
        f.seek(10200)
        assert f.read(100) == data[10200:]  # fewer bytes at the end of the file
    with ReadAhead(path, [(10000, 10300)], part=64) as f:  # the index says more than the file holds
        f.seek(10000)
        assert f.read(300) == data[10000:]


def test_a_failed_part_raises_in_the_read_and_is_fetched_again(blob, monkeypatch):
    path, data = blob
    real, failures = ranges.fetch, [ConnectionResetError("reset by peer")]

    def flaky(url, offset, size):
        if offset == 200 and failures:
            raise failures.pop()
        return real(url, offset, size)

    monkeypatch.setattr(ranges, "fetch", flaky)
    with ReadAhead(path, [(0, 1000)], part=100, depth=4) as f:
        assert f.read(200) == data[:200]
        with pytest.raises(ConnectionResetError):
            f.read(100)
        f.seek(200)  # the caller's retry, from where it failed
        assert f.read(800) == data[200:1000]


def test_a_server_that_sends_more_than_asked_is_refused(monkeypatch):
    monkeypatch.setattr(ranges, "_read_remote", lambda url, offset, size: b"x" * (size + 10))
    with pytest.raises(RangesIgnored, match="ignores HTTP range requests"):
        fetch("http://store/shard.tar", 0, 10)


def test_arguments_are_checked(blob):
    with pytest.raises(ValueError, match="part and depth"):
        ReadAhead(blob[0], [(0, 10)], part=0)
    with ReadAhead(blob[0], [(0, 10)]) as f, pytest.raises(ValueError, match="absolute"):
        f.seek(1, 1)


def test_a_stopped_consumer_ends_the_retries_of_reads_in_flight(monkeypatch):
    stop, calls = threading.Event(), []

    def down(url, offset, size):
        calls.append(offset)
        stop.set()  # the consumer goes while this read fails
        raise ConnectionResetError("reset by peer")

    monkeypatch.setattr(ranges, "fetch", down)
    t0 = time.monotonic()
    with pytest.raises(ConnectionResetError):
        ranges.read_range("http://store/shard.tar", 0, 10, stop)
    assert calls == [0] and time.monotonic() - t0 < 0.4  # no wait, no second try


def test_one_filesystem_serves_every_thread(monkeypatch):
    """fsspec releases before its PR #2028 key their HTTP and S3 filesystems by thread: a reader's threads would
    each open a session. ranges.url_to_fs hands them one per class and options, whatever fsspec's cache does
    (here: none at all, a new instance per call)."""
    import fsspec

    real = fsspec.core.url_to_fs
    monkeypatch.setattr(fsspec.core, "url_to_fs", lambda url, **kw: real(url, skip_instance_cache=True, **kw))
    found, together = [], threading.Barrier(3)

    def open_(n: int) -> None:
        together.wait()
        found.append(ranges.url_to_fs(f"http://store.example/wds/shard-{n}.tar"))
        together.wait()

    threads = [threading.Thread(target=open_, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(fs) for fs, _ in found}) == 1
    assert sorted(p for _, p in found) == [f"http://store.example/wds/shard-{n}.tar" for n in range(3)]


def test_single_reads_over_http_run_as_coroutines_once_ranges_are_known(blob, monkeypatch):
    """The pre-shuffled readers' reads (ranges.read_async): none before the folder has answered a range (a
    thread's read_range checks that), then on fsspec's loop with read_range's retries and checks."""
    pytest.importorskip("aiohttp")
    from pathlib import Path

    from distpddm.data import retry
    from tests import fixtures

    path, data = blob
    sleeps = []

    async def wait(delay):
        sleeps.append(delay)

    monkeypatch.setattr(retry, "_sleep_async", wait)
    stop = threading.Event()
    with fixtures.http_store(Path(path).parent) as store:
        url = f"{store.base}/shard.tar"
        assert ranges.read_async(url, 100, 50, stop) is None and ranges.read_async(path, 100, 50, stop) is None
        assert ranges.read_range(url, 100, 50) == data[100:150]  # at offset > 0: the folder honours ranges
        assert ranges.read_async(url, 300, 4000, None).result(10) == data[300:4300]
        cuts = iter([1, 2])  # the next two GETs send half their body, then close the connection
        store.answer = lambda method, name, nth: "cut" if next(cuts, None) else None
        assert ranges.read_async(url, 5000, 3000, None).result(10) == data[5000:8000] and len(sleeps) == 2
        with pytest.raises(ValueError, match="shorter than when it was indexed"):
            ranges.read_async(url, len(data) - 10, 100, None).result(10)
        store.answer = lambda method, name, nth: 503
        stop.set()  # the reader has gone: no retry
        with pytest.raises(Exception, match="503"):
            ranges.read_async(url, 0, 10, stop).result(10)


def test_reads_started_together_wake_the_loop_once_and_fail_or_cancel_alone(blob, monkeypatch):
    """ranges.read_many_async: a batch of reads is handed to the event loop in one call (each hand-over wakes
    the loop's thread); each read's result or error is its own; a local path gets None (a thread reads it);
    a read cancelled before it ran never sends its request."""
    pytest.importorskip("aiohttp")
    from pathlib import Path

    from tests import fixtures

    path, data = blob
    stop = threading.Event()
    with fixtures.http_store(Path(path).parent) as store:
        url = f"{store.base}/shard.tar"
        assert ranges.read_range(url, 100, 50) == data[100:150]  # the folder honours ranges
        fs, _ = ranges.url_to_fs(url)
        handed, real = [], fs.loop.call_soon_threadsafe

        def counted(callback, *args):
            handed.append(callback)
            return real(callback, *args)

        monkeypatch.setattr(fs.loop, "call_soon_threadsafe", counted)
        reads = [(url, o, 300) for o in range(0, 3000, 300)]
        futures = ranges.read_many_async([*reads, (path, 0, 10), (url, len(data) - 10, 100)], stop)
        assert [f.result(10) for f in futures[:10]] == [data[o : o + 300] for _, o, _ in reads]
        assert futures[10] is None
        with pytest.raises(ValueError, match="shorter than when it was indexed"):  # the batch's other reads stand
            futures[11].result(10)
        assert handed == [ranges._start]  # twelve reads, one wake-up
        gets = store.requests["shard.tar"]
        held_back = []
        monkeypatch.setattr(fs.loop, "call_soon_threadsafe", lambda *args: held_back.append(args))
        (held,) = ranges.read_many_async([(url, 0, 10)], stop)  # its hand-over held back...
        assert held.cancel()  # ...and the read cancelled before it started
        monkeypatch.setattr(fs.loop, "call_soon_threadsafe", real)
        (late,) = ranges.read_many_async([(url, 20, 10)], stop)
        assert late.result(10) == data[20:30]
        real(*held_back[0])  # the held hand-over reaches the loop now...
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), fs.loop).result(10)  # ...and has run
        ((coro, _),) = held_back[0][2]
        assert coro.cr_frame is None and coro.cr_await is None  # closed, never started
        assert store.requests["shard.tar"] == gets + 1  # only `late` was sent
