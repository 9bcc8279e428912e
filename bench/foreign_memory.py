"""A loader worker's memory while it trains from a pre-shuffled split of ImageNet-22k's size (issue 24's bound:
each loader worker under 1 GiB at 20,000 classes), beside a split a tenth that size, in one run.

The split is written directly in `distpddm shards index`'s layout (``index.json``, its selection, one
per-shard index per shard with the members' offsets and sizes; no keys, which training does not read):
``--samples`` samples of ``--classes`` long-tailed classes, pre-shuffled over ``--shards`` shards. Every shard
is a symbolic link to one small tar holding one real JPEG (a crop of scikit-learn's photographs, 500 x 375) and
every sample points at it, so the readers open, read and decode real bytes, through the product's own
:class:`distpddm.data.foreign.ForeignPKDataset` in a DataLoader, as `distpddm train` does. Sampled every 0.2 s
with psutil: each loader worker's USS (pages only it holds: its epoch plan, decoded images, reads in flight)
and PSS (its share of the split's arrays, which forked workers share with the process that built them), and
the main process's RSS. The bound is on a worker's own memory; what is shared is counted once, in the main
process.

    .venv/bin/python bench/foreign_memory.py                 # 13.7M samples / 21,841 classes / 4,096 shards
    .venv/bin/python bench/foreign_memory.py --quick         # 200k / 2,000 / 64: a smoke run
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB = 2**20


def long_tail(samples: int, classes: int, seed: int = 0) -> np.ndarray:
    """Images per class, long-tailed like ImageNet-22k's (a few thousand at the head, a handful at the tail)."""
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 1.2, classes)
    counts = np.maximum(1, np.floor(weights / weights.sum() * samples)).astype(np.int64)
    counts[np.argsort(-weights)[: samples - counts.sum()]] += 1  # to the exact total
    return counts


def write_split(root: Path, samples: int, classes: int, shards: int, seed: int = 0) -> Path:
    """A foreign split at ``root/train`` in `shards index`'s layout; returns its folder."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from distpddm.data.wdsindex import INDEX, INDEX_VERSION, LAYOUT, SHARD_INDEX_DIR, idx_name

    photo = Image.fromarray(load_sample_images().images[0]).resize((500, 375), Image.BICUBIC)
    jpeg = io.BytesIO()
    photo.save(jpeg, "JPEG", quality=90)
    root.mkdir(parents=True)
    tar_path = root / "one.tar"
    with tarfile.open(tar_path, "w") as tar:
        info = tarfile.TarInfo("n00000000/x.jpg")
        info.size = len(jpeg.getvalue())
        tar.addfile(info, io.BytesIO(jpeg.getvalue()))
    offset, size, tar_bytes = 512, len(jpeg.getvalue()), tar_path.stat().st_size

    counts = long_tail(samples, classes, seed)
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(classes, dtype=np.int32), counts))
    per_shard = -(-samples // shards)
    shard_of = (np.arange(samples) // per_shard).astype(np.int32)
    row_of = (np.arange(samples) % per_shard).astype(np.int32)
    split_dir, index_dir, tars = root / "train", root / SHARD_INDEX_DIR, root / "tars"
    for d in (split_dir, index_dir, tars):
        d.mkdir(parents=True)
    table = []
    for s in range(shards):
        name = f"imagenet22k-train-{s:04d}.tar"
        (tars / name).symlink_to(tar_path)
        rows = int((shard_of == s).sum())
        np.savez_compressed(
            index_dir / idx_name(name),
            image_offsets=np.full(rows, offset, np.int64),
            image_sizes=np.full(rows, size, np.int32),
        )
        table.append({"name": name, "url": str(tars / name), "index": f"../{SHARD_INDEX_DIR}/{idx_name(name)}",
                      "samples": rows, "indexed": rows, "bytes": tar_bytes, "etag": None})  # fmt: skip
    np.savez_compressed(split_dir / "samples.npz", shard=shard_of, row=row_of, label=labels)
    index = {
        "version": INDEX_VERSION,
        "layout": LAYOUT,
        "split": "train",
        "source": str(tars),
        "samples": samples,
        "classes": [f"n{c:08d}" for c in range(classes)],
        "class_counts": counts.tolist(),
        "source_labels": list(range(classes)),
        "selection": "samples.npz",
        "subset": {"classes_file": None, "class_names_file": None, "min_per_class": 1},
        "carving": {},
        "shards": table,
        "bad_samples": 0,
        "bad_shards": [],
    }
    (split_dir / INDEX).write_text(json.dumps(index))
    return split_dir


def _memory(pid: int) -> tuple[float, float, float]:
    """(USS, PSS, RSS) in MiB."""
    import psutil

    m = psutil.Process(pid).memory_full_info()
    return m.uss / MIB, m.pss / MIB, m.rss / MIB


def _peak_rss(pid: int) -> float:
    """VmHWM: the process's peak resident set (shared pages it touched included), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(split_dir: Path, workers: int, batches: int, P: int, K: int, size: int, readers: int) -> dict:
    """Build the dataset here, iterate ``batches`` batches through ``workers`` loader workers, sample memory."""
    import torch

    from distpddm.data.foreign import ForeignPKDataset

    torch.set_num_threads(1)
    t = time.perf_counter()
    ds = ForeignPKDataset(str(split_dir), P, K, image_size=size)
    opened = time.perf_counter() - t
    main_after_open = _memory(os.getpid())
    os.environ["WORLD_SIZE"], os.environ["RANK"] = str(readers // workers), "0"  # the plan as on a big job
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)
    peaks: dict[int, list[float]] = {}
    main_peak, done = [0.0], threading.Event()
    it = iter(loader)
    pids = [w.pid for w in getattr(it, "_workers", [])]  # started by iter()

    def sample() -> None:
        while not done.is_set():
            for pid in pids:
                try:
                    uss, pss, rss = _memory(pid)
                except Exception:  # noqa: BLE001 -- a worker gone between two samples
                    continue
                old = peaks.setdefault(pid, [0.0, 0.0, 0.0])
                peaks[pid] = [max(a, b) for a, b in zip(old, (uss, pss, rss), strict=True)]
            main_peak[0] = max(main_peak[0], _memory(os.getpid())[2])
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t = time.perf_counter()
    first = next(it)
    to_first = time.perf_counter() - t
    n = len(first.labels)
    t = time.perf_counter()
    for _ in range(batches - 1):
        n += len(next(it).labels)
    rate = (n - len(first.labels)) / (time.perf_counter() - t) if batches > 1 else None
    done.set()
    sampler.join()
    hwm = [_peak_rss(pid) for pid in pids]  # the kernel's own peak, between samples too
    del it
    rows = sorted(peaks.values())
    return {
        "samples": len(ds.split),
        "classes": len(ds.split.classes),
        "shards": len(ds.split.names),
        "open_s": round(opened, 1),
        "main_rss_after_open_mib": round(main_after_open[2]),
        "main_rss_peak_mib": round(main_peak[0]),
        "first_batch_s": round(to_first, 1),
        "images_per_s": round(rate, 1) if rate else None,
        "worker_uss_peak_mib": [round(r[0]) for r in rows],
        "worker_pss_peak_mib": [round(r[1]) for r in rows],
        "worker_rss_peak_mib": [round(r[2]) for r in rows],
        "worker_vmhwm_mib": sorted(round(h) for h in hwm),
    }


def _join(values: list) -> str:
    return ", ".join(map(str, values))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=13_700_000)
    p.add_argument("--classes", type=int, default=21_841)
    p.add_argument("--shards", type=int, default=4_096)
    p.add_argument("--smaller", type=int, default=10, help="also a split this many times smaller, side by side")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--readers", type=int, default=64, help="rank x loader worker count the plan is dealt to")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--P", type=int, default=64)
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one split, in a fresh process
    args = p.parse_args()
    if args.measure:
        spec = json.loads(args.measure)
        print(json.dumps(measure(Path(spec.pop("split")), **spec)))
        return
    if args.quick:
        args.samples, args.classes, args.shards, args.batches, args.readers, args.P = 200_000, 2_000, 64, 3, 4, 16
    import subprocess

    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores", flush=True)
    results = []
    sizes = [(args.samples, args.classes, args.shards)]
    if args.smaller > 1:
        sizes.insert(
            0, (args.samples // args.smaller, args.classes // args.smaller, max(1, args.shards // args.smaller))
        )
    with tempfile.TemporaryDirectory(prefix="foreign-memory-", dir="/tmp") as tmp:
        for samples, classes, shards in sizes:
            root = Path(tmp) / f"{samples}"
            t = time.perf_counter()
            split = write_split(root, samples, classes, shards)
            made = time.perf_counter() - t
            spec = {"split": str(split), "workers": args.workers, "batches": args.batches, "P": args.P,
                    "K": args.K, "size": args.size, "readers": args.readers}  # fmt: skip
            r = subprocess.run([sys.executable, __file__, "--measure", json.dumps(spec)], capture_output=True,
                               text=True, timeout=3600)  # fmt: skip
            if r.returncode != 0:
                raise SystemExit(f"{samples} samples: {r.stderr[-3000:]}")
            row = json.loads(r.stdout.strip().splitlines()[-1]) | {"written_s": round(made, 1)}
            results.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nP x K = {args.P} x {args.K} at {args.size} px, {args.workers} loader workers, plan dealt to "
          f"{args.readers} readers, {args.batches} batches")  # fmt: skip
    print("\n| samples / classes / shards | open s | main RSS after open (peak) MiB | first batch s "
          "| per worker: USS peak MiB | PSS peak MiB | RSS peak MiB (VmHWM) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in results:
        cells = [f"{r['samples']:,} / {r['classes']:,} / {r['shards']:,}", r["open_s"],
                 f"{r['main_rss_after_open_mib']} ({r['main_rss_peak_mib']})", r["first_batch_s"],
                 _join(r["worker_uss_peak_mib"]), _join(r["worker_pss_peak_mib"]),
                 f"{_join(r['worker_rss_peak_mib'])} ({_join(r['worker_vmhwm_mib'])})"]  # fmt: skip
        print("| " + " | ".join(map(str, cells)) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
