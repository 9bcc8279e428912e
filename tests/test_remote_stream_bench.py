"""bench/remote_stream.py's own parts: it refuses to run where it cannot build its hosts, saying why, and its
delaying relay (the latency of the "HTTP 25 ms" cells: this kernel has no netem) delays each direction by
the set time and hands every byte on intact."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import socket
import threading
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "remote_stream.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("remote_stream_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_it_refuses_to_run_without_root(bench, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit, match="needs root"):
        bench.require_host_tools()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_relay_delays_each_way_and_keeps_the_bytes(bench):
    delay, up, port = 0.05, _free_port(), _free_port()
    loop = asyncio.new_event_loop()

    async def echo(reader, writer):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def serve():
        server = await asyncio.start_server(echo, "127.0.0.1", up)
        async with server:
            await bench._relay(("127.0.0.1", port), ("127.0.0.1", up), delay)

    main = loop.create_task(serve())

    def run():
        asyncio.set_event_loop(loop)
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(main)
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                time.sleep(0.02)
        with conn:
            payload = os.urandom(3 << 20)
            times = []
            for chunk in (b"x", b"y"):  # the first waits for the handshake too: one round trip more
                start = time.perf_counter()
                conn.sendall(chunk)
                assert conn.recv(1) == chunk
                times.append(time.perf_counter() - start)
            # Lower bounds only where a busy machine could stretch the time: the first waits the handshake too.
            assert 2 * delay <= times[1] < 2 * delay + 1.0 and times[0] >= 3 * delay
            sender = threading.Thread(target=conn.sendall, args=(payload,))
            sender.start()
            got = bytearray()
            while len(got) < len(payload):
                got += conn.recv(1 << 20)
            sender.join()
            assert bytes(got) == payload
    finally:
        time.sleep(6 * delay)  # the relay's pumps see both ends close and finish
        loop.call_soon_threadsafe(main.cancel)
        thread.join(5)
