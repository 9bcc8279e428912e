"""Shard builder scaling: ``distpddm shards build --source imagenet`` on a synthetic tree of many tiny files.

The tree has ImageNet's layout (``train/<wnid>/<wnid>_<n>.JPEG``), long-tailed class sizes and real JPEG
bytes (small crops of the photographs scikit-learn ships); it is generated once and kept (``--work``). Each
stage runs the real command line in its own process, measured for wall time and the peak memory of its
process tree (``bench/measure.py``):

1. dry run on a fresh output folder: list the source (parallel scan + sizes), write the listing, carve a
   val split and held-out classes, plan the shards -- everything but writing;
2. the same dry run again: the listing is read back instead of scanning the tree;
3. the build itself (reusing the listing), on all cores;
4. the build again with every shard finished (a rerun after success).

    python bench/builder.py [--images 1000000] [--classes 10000] [--work /tmp/distpddm-builder-bench]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import run  # noqa: E402


def class_sizes(images: int, classes: int, low: int = 5, seed: int = 0) -> np.ndarray:
    """Long-tailed (log-normal) class sizes summing to ``images``, none under ``low``."""
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, 0.8, classes)
    sizes = np.maximum(low, np.floor(weights / weights.sum() * images)).astype(np.int64)
    order = np.argsort(-weights)
    sizes[order[: images - sizes.sum()]] += 1 if images > sizes.sum() else 0
    return sizes


def tiny_jpegs(n: int = 64, size: tuple[int, int] = (32, 24)) -> list[bytes]:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        x, y = int(rng.integers(0, photo.width - 200)), int(rng.integers(0, photo.height - 150))
        buf = io.BytesIO()
        photo.crop((x, y, x + 200, y + 150)).resize(size, Image.BILINEAR).save(buf, format="JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def _write_classes(args) -> int:
    root, first, wnids, sizes, blobs = args
    for c, (wnid, n) in enumerate(zip(wnids, sizes, strict=True), start=first):
        folder = Path(root) / "train" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(int(n)):
            (folder / f"{wnid}_{k}.JPEG").write_bytes(blobs[(7 * c + k) % len(blobs)])
    return int(sum(sizes))


def make_tree(root: Path, images: int, classes: int) -> float:
    """The synthetic tree (kept: a marker names what it holds). Returns the seconds it took (0: reused)."""
    marker = root / "tree.json"
    want = {"images": images, "classes": classes, "version": 1}
    if marker.exists() and json.loads(marker.read_text()).items() >= want.items():
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    sizes = class_sizes(images, classes)
    wnids = [f"n{10000000 + c:08d}" for c in range(classes)]
    blobs = tiny_jpegs()
    jobs = [(str(root), i, wnids[i : i + 200], sizes[i : i + 200], blobs) for i in range(0, classes, 200)]
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        written = sum(pool.map(_write_classes, jobs))
    marker.write_text(json.dumps(want | {"written": written}))
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1_000_000)
    p.add_argument("--classes", type=int, default=10_000)
    p.add_argument("--work", type=Path, default=Path("/tmp/distpddm-builder-bench"))
    p.add_argument("--shard-size", default="16M")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args()

    tree = args.work / "tree"
    made = make_tree(tree, args.images, args.classes)
    images = json.loads((tree / "tree.json").read_text())["written"]
    print(f"tree: {images} files in {args.classes} classes under {tree}" + (f" (made in {made:.0f} s)" if made else ""))
    out = args.work / "shards"
    shutil.rmtree(out, ignore_errors=True)
    cli = [sys.executable, "-m", "distpddm.cli", "shards", "build", "--source", "imagenet", str(tree), str(out),
           "--shard-size", args.shard_size, "--val-per-class", "5", "--holdout-classes", "0.05", "--quiet"]  # fmt: skip
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    stages = [
        ("dry run: list the tree, carve, plan", cli + ["--dry-run"]),
        ("dry run again: reuse the listing", cli + ["--dry-run"]),
        ("build (listing reused)", cli),
        ("rerun, every shard finished", cli),
    ]
    results = []
    for name, cmd in stages:
        print(f"\n== {name}")
        m = run(cmd, env=env)
        if m.returncode != 0:
            raise SystemExit(f"{name} failed:\n{m.output[-3000:]}")
        results.append({"stage": name, **m.row(), "images_per_s": round(images / m.seconds)})
    written = sum(1 for _ in out.glob("*/shard-*.tar"))
    shard_bytes = sum(f.stat().st_size for f in out.glob("*/shard-*.tar"))
    summary = {
        "images": images,
        "classes": args.classes,
        "shards": written,
        "shard_gib": round(shard_bytes / 2**30, 2),
        "listing_mib": round((out / "plan.npz").stat().st_size / 2**20, 1),
        "cores": os.cpu_count(),
        "stages": results,
    }
    print("\n| stage | seconds | images/s | peak MiB (all processes) | main process MiB |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['stage']} | {r['seconds']} | {r['images_per_s']:,} | {r['peak_mib']:,} | {r['main_mib']:,} |")
    print(f"\n{written} shards, {summary['shard_gib']} GiB; listing file {summary['listing_mib']} MiB")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
