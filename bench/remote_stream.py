"""Remote shards: the training stream's (and the eval reader's) images/s over HTTP with latency, against the
same shards on local disk, side by side in one run (issue 24, "Latency").

Two hosts are built as network namespaces (``tests/cluster.py``): ``server`` runs Debian's nginx over the
shards, ``client`` runs the readers. Both ends of their veth link get a ``tc netem`` qdisc: ``rate`` (1 Gbit/s)
always, and ``delay`` 0 ms, then 25 ms each way (a 50 ms round trip). Every cell runs in a fresh process in
``client``; the local cells read the same files from disk (page cache warm: they were just written).

Images: the loader bench's real-photo JPEGs (``bench/loader.py``'s ``make_images``: 500 x 375, quality 90,
~46 KiB), in two layouts:

1. class-chunked: ``distpddm shards build`` from the image folder, read by ``PKBatchDataset`` (over HTTP:
   the split's ``index.json`` URL) and by ``EvalDataset``;
2. pre-shuffled, timm's layout (``<key>.jpg`` + ``.cls`` + ``.json``, samples shuffled over the shards),
   indexed in place (``distpddm shards index``; over HTTP the index is made from the server's URLs, at 0 ms),
   read by ``ForeignPKDataset`` (class-aware ranged reads, ``in_flight`` per loader worker).

``--stores http s3`` also serves the same files over the S3 API: moto's server (the S3 server the tests use;
no faster S3-compatible server installs here from apt or PyPI) in ``server``, behind its own delaying relay,
read through s3fs with the credentials and endpoint in the environment. moto answers each request in Python
on the same two cores, so its server CPU (in the table) limits these cells; their 0 ms -> delay change is the
latency's cost.

Per cell: P x K = 16 x 4 batches of 224-px images (decode + RandomResizedCrop + flip; the consumer normalises
on the CPU, as ``bench/loader.py``), one batch to warm up, then ``--batches`` timed. Bytes: what nginx sent
(its access log) for the HTTP cells, what the loader workers read (``rchar``) for the local ones. The readers'
HTTP requests are timed in the client (wrappers around fsspec's ranged fetch, ``ranges._read_remote`` and
``ranges._read_range_async``; the product code is not changed): requests, mean latency, and the mean number
in flight per loader worker in the timed window. Needs root, ``ip``/``tc`` and nginx (installed with apt-get when
missing, as the tests do)::

    sudo .venv/bin/python bench/remote_stream.py [--images 3000] [--batches 30] [--delay-ms 25]

Cleans up its namespaces, nginx and files on exit (``--keep DIR`` keeps and reuses the data).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

P, K, SIZE = 16, 4, 224
PORT = 8080  # nginx behind its relay: the relay listens here, nginx on PORT + 1
S3_PORT = 8090  # moto behind its relay, likewise (moto on S3_PORT + 1)
PORTS = {"http": PORT, "s3": S3_PORT}
S3_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
PER_TAR = 500  # samples per pre-shuffled shard (timm's hold ~12k; the reads are per image either way)


# ------------------------------------------------------------------------------------------- the readers


def _trace(path: Path):
    """Wrap the HTTP requests of the readers (HEADs, ranged GETs) so that each one's (start, end, bytes) is appended to
    ``path.<pid>`` (loader workers are forked after this: they inherit the wrappers)."""
    from fsspec.implementations.http import HTTPFile, HTTPFileSystem

    from distpddm.data import ranges

    def log(t0: float, n: int) -> None:
        with open(f"{path}.{os.getpid()}", "a") as f:
            f.write(f"{t0} {time.time()} {n}\n")

    fetch_range = HTTPFile._fetch_range
    nested = threading.local()  # a foreign read's own HTTPFile fetch is not logged twice

    def traced_fetch(self, start, end):
        if getattr(nested, "on", False):  # inside traced_read (the foreign reader opens an HTTPFile per image)
            return fetch_range(self, start, end)
        t0 = time.time()
        out = fetch_range(self, start, end)
        log(t0, len(out))
        return out

    read_remote = ranges._read_remote

    def traced_read(url, offset, size):
        if getattr(nested, "on", False):
            return read_remote(url, offset, size)
        nested.on, t0 = True, time.time()
        try:
            out = read_remote(url, offset, size)
        finally:
            nested.on = False
        log(t0, len(out))
        return out

    info = HTTPFileSystem._info  # the HEAD of a file opened (a shard, its index)

    async def traced_info(self, url, **kwargs):
        t0 = time.time()
        out = await info(self, url, **kwargs)
        log(t0, 0)
        return out

    read_async = ranges._read_range_async  # a single image read as a coroutine (ranges.read_async)

    async def traced_async(fs, path, url, offset, size, stop):
        t0 = time.time()
        out = await read_async(fs, path, url, offset, size, stop)
        log(t0, len(out))
        return out

    HTTPFile._fetch_range = traced_fetch
    HTTPFileSystem._info = traced_info
    with contextlib.suppress(ImportError):
        from s3fs import S3FileSystem

        s3_info = S3FileSystem._info

        async def traced_s3_info(self, path, **kwargs):
            t0 = time.time()
            out = await s3_info(self, path, **kwargs)
            log(t0, 0)
            return out

        S3FileSystem._info = traced_s3_info
    ranges._read_remote = traced_read
    ranges._read_range_async = traced_async


def _requests(path: Path, t0: float, t1: float, workers: int) -> dict:
    """The traced requests that ended in [t0, t1]: count, mean latency, mean in flight per loader worker."""
    spans, total = [], 0
    for f in path.parent.glob(path.name + ".*"):
        for line in f.read_text().split("\n"):
            if line:
                a, b, n = line.split()
                spans.append((float(a), float(b)))
                total += int(n)
    inside = [(a, b) for a, b in spans if t0 <= b <= t1]
    busy = sum(min(b, t1) - max(a, t0) for a, b in spans if b >= t0 and a <= t1)
    return {
        "traced_requests": len(spans),  # the whole cell, warm-up and read-ahead included
        "traced_bytes": total,
        "requests": len(inside),
        "latency_ms": 1000 * sum(b - a for a, b in inside) / len(inside) if inside else None,
        "mean_in_flight": busy / (t1 - t0) / workers,
    }


def _rchar(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/io").read_text().split("\n"):
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def measure(spec: dict) -> dict:
    """One cell, in this process: images/s arriving as normalised batches in the consumer."""
    import torch

    from distpddm.data.evalset import eval_dataset
    from distpddm.data.foreign import ForeignPKDataset
    from distpddm.data.stream import PKBatchDataset
    from distpddm.data.transforms import normalize_batch

    torch.set_num_threads(1)
    trace = Path(spec["trace"])
    _trace(trace)
    workers = spec["workers"]
    if spec["reader"] == "eval":
        ds = eval_dataset(spec["split"], image_size=SIZE)  # EvalDataset, or ForeignEvalDataset (its default)
        loader = torch.utils.data.DataLoader(ds, batch_size=P * K, num_workers=workers)
    else:
        if spec["layout"] == "foreign":
            ds = ForeignPKDataset(spec["split"], P, K, image_size=SIZE, in_flight=spec["in_flight"])
        else:
            ds = PKBatchDataset(spec["split"], P, K, image_size=SIZE)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    it = iter(loader)
    next(it)  # workers started, first batch ready
    pids = [os.getpid(), *(w.pid for w in getattr(it, "_workers", []))]
    cpu0 = sum(cpu_seconds(pid) for pid in pids)
    t0 = time.time()
    n, buffer = 0, None
    for _ in range(spec["batches"]):
        x = next(it)[0]
        x = buffer = normalize_batch(x, out=buffer if buffer is not None and len(buffer) == len(x) else None)
        n += len(x)
    t1 = time.time()
    cpu = sum(cpu_seconds(pid) for pid in pids) - cpu0
    rchar = sum(_rchar(w.pid) for w in getattr(it, "_workers", []))
    del it
    return {"images": n, "seconds": t1 - t0, "img_s": n / (t1 - t0), "rchar": rchar, "client_cpu_s": cpu} | _requests(
        trace, t0, t1, workers
    )


# ------------------------------------------------------------------------------------------- the data


def make_data(root: Path, images: int, classes: int) -> dict:
    """The image folder, its class-chunked split, and the same images as pre-shuffled timm-layout tars."""
    import numpy as np

    from bench.loader import make_images
    from distpddm.data.shards import BuildOptions, build
    from distpddm.data.sources import read_source
    from tests.test_wdsindex import write_tar

    done = root / "data.json"
    if done.exists():
        return json.loads(done.read_text())
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    t = time.perf_counter()
    make_images(root / "src", images, classes)
    build(read_source("folder", root / "src"), root / "chunked", BuildOptions(shard_bytes=32 * 2**20, progress=False))
    files = sorted((root / "src").rglob("*.jpg"))
    order = np.random.default_rng(1).permutation(len(files))
    names = sorted({f.parent.name for f in files})
    (root / "wds").mkdir()
    tars = -(-len(files) // PER_TAR)
    for s in range(tars):
        members = []
        for i in order[s * PER_TAR : (s + 1) * PER_TAR].tolist():
            f = files[i]
            label = names.index(f.parent.name)
            meta = {"label": label, "class_name": f.parent.name, "filename": f.name, "width": 500, "height": 375}
            key = f"{f.parent.name}/{f.stem}"
            members += [(f"{key}.jpg", f.read_bytes()), (f"{key}.cls", str(label).encode())]
            members.append((f"{key}.json", json.dumps(meta).encode()))
        write_tar(root / "wds" / f"train-{s:04d}.tar", members)
    info = {
        "images": len(files),
        "classes": len(names),
        "jpeg_kib": sum(f.stat().st_size for f in files) / len(files) / 1024,
        "tars": tars,
        "chunked_shards": len(list((root / "chunked" / "train").glob("*.tar"))),
        "seconds": time.perf_counter() - t,
    }
    done.write_text(json.dumps(info))
    return info


# ------------------------------------------------------------------------------------------- the hosts


def require_host_tools() -> str:
    """nginx's path, or SystemExit saying why this machine cannot run the bench (the tests' own checks)."""
    import pytest

    from tests.cluster import require_netns
    from tests.test_wdsindex import nginx_binary

    if os.geteuid() != 0:
        raise SystemExit("bench/remote_stream.py needs root: it builds network namespaces and tc qdiscs")
    try:
        require_netns()
        if shutil.which("tc") is None:
            raise SystemExit("bench/remote_stream.py needs tc (iproute2) for the netem qdiscs")
        return nginx_binary()
    except pytest.skip.Exception as e:
        raise SystemExit(f"bench/remote_stream.py cannot run here: {e.msg}") from None


def nginx_conf(run: Path, root: Path) -> Path:
    conf = run / "nginx.conf"
    conf.write_text(f"""
user root;
worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/error.log;
events {{ worker_connections 1024; }}
http {{
    log_format sent '$request_method $uri $status $bytes_sent';
    access_log {run}/access.log sent;
    client_body_temp_path {run}/body; proxy_temp_path {run}/proxy; fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi; scgi_temp_path {run}/scgi;
    sendfile on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{PORT + 1};
        root {root};
    }}
}}
""")
    return conf


def set_rate(cluster, rate: str) -> None:
    """A token bucket on both ends of the link (this kernel has no netem: the delay is :func:`relay`'s)."""
    from tests.cluster import IFACE

    for host in cluster.names:
        args = ["tc", "qdisc", "replace", "dev", IFACE, "root", "tbf", "rate", rate, "burst", "1mb", "latency", "100ms"]
        r = cluster.run(host, args)
        if r.returncode != 0:
            raise RuntimeError(f"tc in {host}: {r.stderr}")


async def _relay(listen: tuple[str, int], upstream: tuple[str, int], delay: float) -> None:
    """A TCP relay that hands on every chunk ``delay`` seconds after it arrived, in both directions: a wire
    of that one-way delay, bytes pipelined as on a real one (no request waits for another). A new connection's
    first bytes wait one round trip more (TCP's handshake)."""
    import asyncio

    loop = asyncio.get_running_loop()

    async def pump(reader, writer, not_before: float) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if not data:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            while True:
                data = await reader.read(1 << 16)
                queue.put_nowait((max(loop.time(), not_before) + delay, data))
                if not data:
                    break
        except OSError:
            queue.put_nowait((0, b""))
        with contextlib.suppress(OSError):
            await sender

    async def serve(reader, writer) -> None:
        handshake = loop.time() + 2 * delay
        try:
            up_reader, up_writer = await asyncio.open_connection(*upstream)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pump(reader, up_writer, handshake), pump(up_reader, writer, 0), return_exceptions=True)
        for w in (writer, up_writer):
            w.close()

    server = await asyncio.start_server(serve, *listen, backlog=1024)
    async with server:
        await server.serve_forever()


def start_relay(cluster, ip: str, delay_ms: float, port: int = PORT):
    """The relay in the server host, from its link address's ``port`` to the server on its loopback's
    ``port + 1`` (nginx, or moto)."""
    spec = json.dumps({"listen": [ip, port], "upstream": ["127.0.0.1", port + 1], "delay": delay_ms / 1000})
    return cluster.popen("server", [sys.executable, __file__, "--relay", spec])


def start_s3(cluster, data: Path) -> None:
    """moto's S3 server on the server host's loopback, with bucket ``shards`` holding ``data``'s class-chunked
    split and pre-shuffled tars (uploaded on the server host: no relay, no delay)."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        raise SystemExit("--stores s3 needs moto[server] (pip install -e '.[dev]')") from None
    cluster.popen("server", [sys.executable, "-m", "moto.server", "-p", str(S3_PORT + 1)],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    upload = (
        "import boto3, pathlib, sys, time\n"
        "s3 = boto3.client('s3', endpoint_url=sys.argv[1])\n"
        "for _ in range(100):\n"
        "    try:\n"
        "        s3.create_bucket(Bucket='shards'); break\n"
        "    except Exception:\n"
        "        time.sleep(0.2)\n"
        "root = pathlib.Path(sys.argv[2])\n"
        "for d in ('chunked', 'wds'):\n"
        "    for f in sorted((root / d).rglob('*')):\n"
        "        if f.is_file():\n"
        "            s3.upload_file(str(f), 'shards', str(f.relative_to(root)))\n"
    )
    t = time.perf_counter()
    env = os.environ | S3_ENV
    r = cluster.run("server", [sys.executable, "-c", upload, f"http://127.0.0.1:{S3_PORT + 1}", str(data)], env=env)
    if r.returncode != 0:
        raise RuntimeError(f"uploading to moto: {r.stderr[-2000:]}")
    print(f"uploaded the shards to moto's S3 server in {time.perf_counter() - t:.1f} s", flush=True)


def stop(proc) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_cpu(cluster) -> float:
    """CPU seconds so far of the server host's processes (nginx, the relay)."""
    from tests.cluster import namespace_pids

    total = 0.0
    for pid in namespace_pids(cluster.ns["server"]):
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


def round_trip_ms(cluster, base: str) -> float:
    """The median time of a small GET on a kept-alive connection from the client: one round trip."""
    probe = (
        "import http.client, statistics, sys, time, urllib.parse\n"
        "u = urllib.parse.urlsplit(sys.argv[1])\n"
        "c = http.client.HTTPConnection(u.hostname, u.port, timeout=10)\n"
        "t = []\n"
        "for _ in range(6):\n"
        "    s = time.perf_counter()\n"
        "    c.request('GET', '/data.json')\n"
        "    c.getresponse().read()\n"
        "    t.append(time.perf_counter() - s)\n"
        "print(1000 * statistics.median(t[1:]))\n"
    )
    r = cluster.run("client", [sys.executable, "-c", probe, base], timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"the server is unreachable from the client: {r.stderr[-1000:]}")
    return float(r.stdout)


def sent(log: Path) -> tuple[int, int]:
    lines = [line.split() for line in log.read_text().splitlines()] if log.exists() else []
    return len(lines), sum(int(f[3]) for f in lines)


# ------------------------------------------------------------------------------------------- the run


def run(args) -> None:
    from tests.cluster import Cluster

    nginx = require_host_tools()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="remote-stream-", dir="/tmp"))
    try:
        data = make_data(work / "data", args.images, args.classes)
        print(
            f"{data['images']} JPEGs of 500 x 375 ({data['jpeg_kib']:.1f} KiB each), {data['classes']} classes; "
            f"{data['chunked_shards']} class-chunked shards, {data['tars']} pre-shuffled tars",
            flush=True,
        )
        with Cluster(("client", "server")) as cluster:
            ip = cluster.ip["server"]
            run_dir = work / "nginx"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir()
            conf = nginx_conf(run_dir, work / "data")
            cluster.popen("server", [nginx, "-c", str(conf), "-p", str(run_dir), "-g", "daemon off;"])
            base = f"http://{ip}:{PORT}"
            set_rate(cluster, args.rate)
            relays = {"http": start_relay(cluster, ip, 0)}
            s3_env = {}
            if "s3" in args.stores:
                start_s3(cluster, work / "data")
                relays["s3"] = start_relay(cluster, ip, 0, PORTS["s3"])
                s3_env = S3_ENV | {"AWS_ENDPOINT_URL": f"http://{ip}:{S3_PORT}"}
            for _ in range(100):
                with contextlib.suppress(RuntimeError):
                    round_trip_ms(cluster, base)
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError(f"nginx or the relay did not start: {(run_dir / 'error.log').read_text()}")
            env = cluster.ray_env(s3_env)
            # The pre-shuffled split indexed in place, from the local files and from the servers' URLs (at 0 ms).
            indexes = {}
            sources = {"local": str(work / "data" / "wds"), "http": f"{base}/wds", "s3": "s3://shards/wds"}
            for where in ["local", *args.stores]:
                src = sources[where]
                out = work / f"index-{where}"
                if not (out / "train" / "index.json").exists():
                    pattern = f"{src}/train-{{0000..{data['tars'] - 1:04d}}}.tar"
                    t = time.perf_counter()
                    r = cluster.run("client", [sys.executable, "-m", "distpddm.cli", "shards", "index", pattern,
                                               str(out), "--quiet"], env=env, timeout=600)  # fmt: skip
                    if r.returncode != 0:
                        raise RuntimeError(f"shards index {pattern}: {r.stdout[-2000:]}{r.stderr[-2000:]}")
                    print(f"indexed {pattern} in {time.perf_counter() - t:.1f} s", flush=True)
                indexes[where] = str(out / "train")
            chunked = {"local": str(work / "data" / "chunked" / "train"), "http": f"{base}/chunked/train/index.json",
                       "s3": "s3://shards/chunked/train/index.json"}  # fmt: skip
            splits = {("chunked", w): chunked[w] for w in indexes} | {("foreign", w): i for w, i in indexes.items()}
            cells = [("chunked", "train", None), ("chunked", "eval", None)]
            cells += [("foreign", "train", n) for n in args.in_flight] + [("foreign", "eval", None)]
            cells = [c for c in cells if c[1] in args.readers]
            results, rtts = [], {}
            for repeat in range(args.repeats):
                for delay in (0, args.delay_ms):
                    for store in list(relays):
                        stop(relays[store])
                        relays[store] = start_relay(cluster, ip, delay, PORTS[store])
                    time.sleep(0.5)
                    rtts[delay] = round_trip_ms(cluster, base)
                    print(
                        f"delay {delay:g} ms each way, rate {args.rate}: a GET takes {rtts[delay]:.1f} ms", flush=True
                    )
                    for workers in args.workers:
                        for layout, reader, in_flight in cells:
                            wheres = ["local", *args.stores] if delay == 0 else list(args.stores)
                            if in_flight is not None and in_flight != args.in_flight[0] and delay == 0:
                                wheres = []  # the other in_flight values: at the delay only
                            for where in wheres:
                                spec = {
                                    "layout": layout,
                                    "reader": reader,
                                    "split": splits[layout, where],
                                    "workers": workers,
                                    "in_flight": in_flight,
                                    "batches": args.batches,
                                    "trace": str(work / f"trace-{len(results)}" / "t"),
                                }
                                shutil.rmtree(Path(spec["trace"]).parent, ignore_errors=True)  # a kept run's
                                Path(spec["trace"]).parent.mkdir()
                                before, cpu = sent(run_dir / "access.log"), server_cpu(cluster)
                                r = cluster.run("client", [sys.executable, __file__, "--measure", json.dumps(spec)],
                                                env=env, timeout=600)  # fmt: skip
                                if r.returncode != 0:
                                    raise RuntimeError(f"{spec}: {r.stdout[-2000:]}{r.stderr[-4000:]}")
                                out = json.loads(r.stdout.strip().split("\n")[-1])
                                after = sent(run_dir / "access.log")
                                row = spec | out | {"where": where if where == "local" else f"{where} {delay:g} ms"}
                                if where == "http":  # nginx's log; moto logs no bytes (the traced ones stand in)
                                    row |= {"http_requests": after[0] - before[0], "http_bytes": after[1] - before[1]}
                                row |= {"server_cpu_s": server_cpu(cluster) - cpu, "repeat": repeat}
                                results.append(row)
                                shown = {k: v for k, v in row.items() if k not in ("split", "trace")}
                                print(json.dumps(shown), flush=True)
            report(results, args, rtts)
            if args.json:
                Path(args.json).write_text(json.dumps({"data": data, "round_trip_ms": rtts, "results": results}))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def report(results: list[dict], args, rtts: dict) -> None:
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["layout"], r["reader"], r["in_flight"], r["workers"], r["where"]), []).append(r)

    def med(rows, key):
        vals = [r[key] for r in rows if r[key] is not None]
        return statistics.median(vals) if vals else None

    print(f"\nimages/s: median of {args.repeats} run(s); {args.batches} batches of {P} x {K} timed per cell")
    head = ["layout / reader", "loader workers", "where", "images/s (runs)", "vs local", "MB read (requests)"]
    head += ["readers' CPU ms/image (server CPU per cell)", "requests: mean latency, in flight per worker"]
    print("\n| " + " | ".join(head) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for (layout, reader, in_flight, workers, where), rows in groups.items():
        first = args.in_flight[0] if layout == "foreign" and reader == "train" else None  # others: vs the first's
        base = groups.get((layout, reader, first, workers, "local"))
        rate = med(rows, "img_s")
        ratio = f"{rate / med(base, 'img_s'):.0%}" if base else ""
        runs = ", ".join(f"{r['img_s']:.0f}" for r in rows)
        if where == "local":
            read = f"{med(rows, 'rchar') / 1e6:.0f} (disk)"
            lat = ""
        elif where.startswith("http"):
            read = f"{med(rows, 'http_bytes') / 1e6:.0f} ({med(rows, 'http_requests'):.0f})"
        else:  # S3: what the readers' traced requests received
            read = f"{med(rows, 'traced_bytes') / 1e6:.0f} ({med(rows, 'traced_requests'):.0f}, traced)"
        if where != "local":
            latency = med(rows, "latency_ms")  # None: no request ended in the timed window
            lat = f"{latency:.1f} ms, " if latency is not None else "none timed, "
            lat += f"{med(rows, 'mean_in_flight'):.2f}"
        name = {"chunked": "class-chunked", "foreign": "pre-shuffled"}[layout] + f" / {reader}"
        name += f" (in_flight {in_flight})" if in_flight else ""
        cpu = f"{1000 * med(rows, 'client_cpu_s') / med(rows, 'images'):.2f}"
        if where != "local":
            cpu += f" ({med(rows, 'server_cpu_s'):.1f} s)"
        print(f"| {name} | {workers} | {where} | {rate:.0f} ({runs}) | {ratio} | {read} | {cpu} | {lat} |")
    print("\n" + "; ".join(f"a GET at {d:g} ms each way: {t:.1f} ms" for d, t in rtts.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--classes", type=int, default=60)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--in-flight", type=int, nargs="+", help="ForeignPKDataset's, per worker (default: its own)")
    p.add_argument("--delay-ms", type=float, default=25, help="netem delay, each way")
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--readers", nargs="+", choices=("train", "eval"), default=["train", "eval"], help="which to time")
    p.add_argument("--stores", nargs="+", choices=("http", "s3"), default=["http"], help="what serves the shards")
    p.add_argument("--keep", metavar="DIR", help="keep the data (and reuse it) in DIR")
    p.add_argument("--json", help="write every cell's figures here")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one cell, in the client host
    p.add_argument("--relay", help=argparse.SUPPRESS)  # internal: the delaying relay, in the server host
    args = p.parse_args()
    if args.relay:
        import asyncio

        spec = json.loads(args.relay)
        asyncio.run(_relay(tuple(spec["listen"]), tuple(spec["upstream"]), spec["delay"]))
        return
    if args.measure:
        print(json.dumps(measure(json.loads(args.measure))))
        return
    if args.in_flight is None:
        from distpddm.data.foreign import IN_FLIGHT

        args.in_flight = [IN_FLIGHT]
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores", flush=True)
    run(args)


if __name__ == "__main__":
    main()
