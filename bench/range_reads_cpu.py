"""Client CPU per ranged HTTP read, two ways side by side in one run: the pre-shuffled reader's way today
(``ranges.read_range`` called from a pool of 32 threads, each blocking in fsspec's sync wrapper) against the
same GETs as coroutines submitted to fsspec's own event loop (32 in flight, no reader threads). The question
it answers: how much of the pre-shuffled reader's extra CPU per image over HTTP (docs/benchmarks.md, "Remote
shards: latency") is the threads' and not the HTTP client's.

Debian's nginx on loopback (no delay: CPU only) serves a file of random bytes; ``--reads`` reads of 46 KiB
(the latency bench's mean image) at random offsets, the same list for every pass; the passes alternate.
Process CPU (``time.process_time``) counts the client only: nginx is another process::

    .venv/bin/python bench/range_reads_cpu.py [--reads 3000] [--repeats 3]

``--s3``: the client CPU of the S3 API instead. moto's S3 server (another process on loopback) holds a 4 MiB
object (moto reads the whole object for each ranged GET, so a small one); the same reads as the readers make
them (``ranges.read_async`` on the ``s3://`` URL: s3fs, whose botocore builds, signs and parses each request)
against plain HTTP GETs of a presigned URL of the object (``ranges.read_async`` on that URL: aiohttp only; a
way the readers tried in 6387e8a and dropped, docs/benchmarks.md), both as coroutines, 32 in flight. moto's
slowness bounds reads/s alike for both; the CPU per read is the client's::

    .venv/bin/python bench/range_reads_cpu.py --s3 [--reads 1500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

IN_FLIGHT, SIZE, FILE_BYTES = 32, 47_000, 64 << 20


def timed(submit, reads: list[tuple[str, int]]) -> tuple[float, float]:
    """(reads/s, client CPU ms per read) with ``IN_FLIGHT`` reads submitted ahead of the one awaited."""
    t0, c0 = time.perf_counter(), time.process_time()
    pending, todo = deque(), iter(reads)
    for _ in range(IN_FLIGHT):
        pending.append(submit(*next(todo)))
    while pending:
        assert len(pending.popleft().result()) == SIZE
        nxt = next(todo, None)
        if nxt is not None:
            pending.append(submit(*nxt))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return len(reads) / wall, 1000 * cpu / len(reads)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reads", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--s3", action="store_true", help="the S3 API's client CPU (moto) instead of nginx's")
    args = p.parse_args()
    if args.s3:
        return s3(args)

    import fsspec.asyn

    from bench.remote_stream import PORT, nginx_conf
    from distpddm.data import ranges
    from tests.fixtures import wait_for_port
    from tests.test_wdsindex import nginx_binary

    with tempfile.TemporaryDirectory() as tmp:
        root, run = Path(tmp) / "data", Path(tmp) / "nginx"
        root.mkdir()
        run.mkdir()
        (root / "blob.bin").write_bytes(random.Random(0).randbytes(FILE_BYTES))
        server = subprocess.Popen(
            [nginx_binary(), "-c", str(nginx_conf(run, root)), "-p", str(run), "-g", "daemon off;"]
        )
        try:
            if not wait_for_port(PORT + 1, 10):
                raise SystemExit(f"nginx did not start: {(run / 'error.log').read_text()}")
            url = f"http://127.0.0.1:{PORT + 1}/blob.bin"
            rng = random.Random(1)
            reads = [(url, rng.randrange(FILE_BYTES - SIZE)) for _ in range(args.reads)]
            pool = ThreadPoolExecutor(IN_FLIGHT)
            fs, _ = ranges.url_to_fs(url)
            loop = fsspec.asyn.get_loop()
            ways = {
                "32 threads, ranges.read_range (the reader today)": lambda u, o: pool.submit(
                    ranges.read_range, u, o, SIZE
                ),
                "coroutines on fsspec's loop, 32 in flight": lambda u, o: asyncio.run_coroutine_threadsafe(
                    fs._cat_file(u, start=o, end=o + SIZE), loop
                ),
            }
            timed(ways[next(iter(ways))], reads[:300])  # warm: connections open, code paths loaded
            results: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}
            for _ in range(args.repeats):
                for name, submit in ways.items():
                    results[name].append(timed(submit, reads))
            print(
                f"{args.reads} ranged GETs of {SIZE} B from nginx on loopback, {IN_FLIGHT} in flight, "
                f"{args.repeats} passes"
            )
            print("| way | reads/s (passes) | client CPU ms/read (passes) |\n|---|---|---|")
            for name, got in results.items():
                rates = ", ".join(f"{r:.0f}" for r, _ in got)
                cpus = ", ".join(f"{c:.3f}" for _, c in got)
                print(f"| {name} | {rates} | {cpus} |")
        finally:
            server.terminate()
            server.wait(10)
    return 0


def s3(args) -> int:
    import os
    import socket

    from distpddm.data import ranges
    from tests.fixtures import wait_for_port

    try:
        import boto3
        import moto.server  # noqa: F401
    except ImportError:
        raise SystemExit("--s3 needs moto[server] and boto3 (pip install -e '.[dev]')") from None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    blob = 4 << 20
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")  # fmt: skip
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        if not wait_for_port(port, 30):
            raise SystemExit("moto's server did not start")
        client = boto3.client("s3")
        client.create_bucket(Bucket="shards")
        client.put_object(Bucket="shards", Key="blob.bin", Body=random.Random(0).randbytes(blob))
        url = "s3://shards/blob.bin"
        fs, _ = ranges.url_to_fs(url)
        rng, stop = random.Random(1), threading.Event()
        reads = [rng.randrange(blob - SIZE) for _ in range(args.reads)]
        signed = fs.url("shards/blob.bin", expires=3600)
        ranges.read_range(signed, 1, SIZE)  # its folder has honoured a range: read_async takes it from now on
        ways = {
            "the readers' way: s3fs's requests, botocore signs each": url,
            "HTTP GETs of a presigned URL (aiohttp only)": signed,
        }
        for way in ways.values():
            timed(lambda u, o: ranges.read_async(u, o, SIZE, stop), [(way, o) for o in reads[:200]])  # warm
        results: dict[str, list[tuple[float, float]]] = {w: [] for w in ways}
        for _ in range(args.repeats):
            for name, way in ways.items():
                results[name].append(timed(lambda u, o: ranges.read_async(u, o, SIZE, stop), [(way, o) for o in reads]))
        print(f"{args.reads} ranged GETs of {SIZE} B from moto's S3 server on loopback, {IN_FLIGHT} in flight, "
              f"{args.repeats} passes")  # fmt: skip
        print("| way | reads/s (passes) | client CPU ms/read (passes) |\n|---|---|---|")
        for name, got in results.items():
            print(f"| {name} | {', '.join(f'{r:.0f}' for r, _ in got)} | {', '.join(f'{c:.3f}' for _, c in got)} |")
    finally:
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
