"""The ImageNet-10K dress rehearsal: its shape on this machine, through the real path, stage by stage.

1. **tree**: a synthetic source in ImageNet's layout (``train/<wnid>/<wnid>_<n>.JPEG``): 10,000 classes
   with long-tailed sizes (5 .. 150 images), tiny photographs of glyphs (class = one glyph of one font,
   each image moved, turned, scaled, coloured and noised), and ImageNet's quirks: grayscale and CMYK
   JPEGs, PNG bytes behind a .JPEG name, and a few truncated files. Generated once and kept.
2. **build**: ``distpddm shards build --source imagenet`` carving a per-class val split and held-out
   classes, skipping (and listing) the broken files.
3. **train**: ``distpddm train configs/rehearsal.yaml`` on a local Ray cluster with 2 workers (DeepSpeed,
   gather with gradient, PDDM mining), validated on the held-out classes at step 0 and at the end (the
   trainer's validation stands in for ``distpddm eval`` until the evaluation issue lands).

Each stage prints its wall time and the peak memory of its whole process tree (``bench/measure.py``)::

    python bench/rehearsal.py [--classes 10000] [--steps 300] [--work /tmp/distpddm-rehearsal]
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from measure import print_stages, run  # noqa: E402


def class_sizes(classes: int, seed: int = 0) -> np.ndarray:
    """Long-tailed sizes from 5 to 150: most classes small, a few large (mean about 30)."""
    u = np.random.default_rng(seed).random(classes)
    return np.round(5 * 30 ** (u**2.2)).astype(np.int64)


def _photo(glyph: np.ndarray, rng: np.random.Generator):
    """One photograph of a glyph: moved, turned, scaled, coloured on a coloured ground, noised; 32 x 32."""
    from PIL import Image, ImageOps

    img = Image.fromarray(glyph).resize((40, 40), Image.BILINEAR)
    img = img.rotate(
        float(rng.uniform(-12, 12)), Image.BILINEAR, translate=tuple(int(v) for v in rng.integers(-3, 4, 2))
    )
    side = int(rng.integers(30, 40))
    img = img.crop(((40 - side) // 2, (40 - side) // 2, (40 + side) // 2, (40 + side) // 2)).resize(
        (32, 32), Image.BILINEAR
    )
    fg, bg = rng.integers(130, 256, 3), rng.integers(0, 110, 3)
    img = ImageOps.colorize(img, black=tuple(int(v) for v in bg), white=tuple(int(v) for v in fg))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, (32, 32, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _write_classes(job) -> int:
    root, first, wnids, sizes, glyphs = job
    written = 0
    for c, (wnid, n, glyph) in enumerate(zip(wnids, sizes, glyphs, strict=True), start=first):
        rng = np.random.default_rng(c)
        folder = Path(root) / "train" / wnid
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(int(n)):
            img = _photo(glyph, rng)
            quirk = rng.random()
            buf = io.BytesIO()
            if quirk < 0.01:
                img.convert("L").save(buf, format="JPEG", quality=85)  # grayscale
            elif quirk < 0.015:
                img.convert("CMYK").save(buf, format="JPEG", quality=85)  # CMYK, as some ImageNet files
            elif quirk < 0.017:
                img.convert("RGBA").save(buf, format="PNG")  # a PNG behind a .JPEG name
            else:
                img.save(buf, format="JPEG", quality=85)
            (folder / f"{wnid}_{k}.JPEG").write_bytes(buf.getvalue())
            written += 1
    return written


def make_tree(root: Path, classes: int) -> tuple[float, int]:
    """The synthetic tree, kept between runs (a marker names what it holds). Returns (seconds, images)."""
    from distpddm.data.glyphs import load_glyphs

    marker = root / "tree.json"
    want = {"classes": classes, "version": 1}
    if marker.exists() and json.loads(marker.read_text()).items() >= want.items():
        return 0.0, json.loads(marker.read_text())["images"]
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    glyphs = load_glyphs(size=32)  # every glyph of every font: 62 x ~460 distinct pictures
    pick = np.random.default_rng(0).choice(len(glyphs.images), classes, replace=len(glyphs.images) < classes)
    sizes = class_sizes(classes)
    wnids = [f"n{10000000 + 37 * c:08d}" for c in range(classes)]
    jobs = [(str(root), i, wnids[i : i + 250], sizes[i : i + 250], glyphs.images[pick[i : i + 250]])
            for i in range(0, classes, 250)]  # fmt: skip
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        images = sum(pool.map(_write_classes, jobs))
    for n in range(max(1, classes // 2000)):  # truncated JPEGs spread over the tree (5 in 10,000 classes)
        victim = root / "train" / wnids[(n * 7919) % classes] / f"{wnids[(n * 7919) % classes]}_0.JPEG"
        victim.write_bytes(victim.read_bytes()[:150])
    marker.write_text(json.dumps(want | {"images": images}))
    return time.perf_counter() - start, images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--work", type=Path, default=Path("/tmp/distpddm-rehearsal"))
    p.add_argument("--out", type=Path, help="write the stage table as JSON here")
    args = p.parse_args()
    env = os.environ | {"PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    stages = []

    print(f"== tree: {args.classes} classes in ImageNet's layout under {args.work / 'tree'}")
    seconds, images = make_tree(args.work / "tree", args.classes)
    stages.append(
        {
            "stage": "tree (synthetic source)",
            "seconds": round(seconds, 1),
            "note": f"{images} images" + (" (kept)" if not seconds else ""),
        }
    )
    print(f"{images} images" + (f", made in {seconds:.0f} s" if seconds else " (kept from an earlier run)"))

    shards = args.work / "shards"
    shutil.rmtree(shards, ignore_errors=True)
    print("\n== build: shards with a val split and held-out classes")
    cli = [sys.executable, "-m", "distpddm.cli"]
    carve = ["--val-per-class", "3", "--holdout-classes", "0.1"]
    build = run(
        [*cli, "shards", "build", "--source", "imagenet", str(args.work / "tree"), str(shards), *carve]
        + ["--shard-size", "16M", "--skip-bad", "--quiet"],
        env=env,
        cwd=REPO,
    )
    if build.returncode:
        raise SystemExit("the build failed")
    index = {s: json.loads((shards / s / "index.json").read_text()) for s in ("train", "val", "holdout")}
    splits = ", ".join(
        f"{s}: {i['samples']} images / {len(i['classes'])} classes / {len(i['shards'])} shards"
        for s, i in index.items()
    )
    bad = sum(len(i["bad_files"]) for i in index.values())
    stages.append({"stage": "build (list, carve, write 3 splits)", **build.row(), "note": f"{splits}; {bad} bad files"})

    runs = args.work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    print("\n== train: 2 Ray workers, validation on the held-out classes at step 0 and at the end")
    overrides = [
        f"data.train_shards={shards / 'train'}",
        f"data.val_shards={shards / 'holdout'}",
        f"ray.storage_path={runs}",
        f"train.steps={args.steps}",
        "train.progress=false",
    ]
    train = run([*cli, "train", "configs/rehearsal.yaml", *overrides], env=env, cwd=REPO)
    if train.returncode:
        raise SystemExit("training failed")
    metrics = [json.loads(line) for line in (runs / "rehearsal" / "metrics.jsonl").read_text().splitlines()]
    last = next(m for m in reversed(metrics) if "loss" in m)
    before, after = next(m for m in metrics if m["step"] == 0), metrics[-1]
    note = (
        f"held-out R@1 {before['val_recall@1']:.3f} -> {after['val_recall@1']:.3f} ({int(after['val_images'])} "
        f"images); {last['images_per_s']:.0f} images/s; data epoch {int(last['data_epoch'])}, "
        f"{100 * last['data_used']:.0f}% of the samples read placed in batches"
    )
    stages.append(
        {"stage": f"train ({args.steps} steps, 2 workers) + held-out validation", **train.row(), "note": note}
    )
    print(f"\ntraining's memory at its peak, MiB by process: {train.breakdown()}")
    stages[-1]["memory_at_peak_mib"] = {name: round(mib) for name, (_, mib) in train.at_peak.items()}

    print_stages(stages)
    if args.out:
        args.out.write_text(json.dumps({"classes": args.classes, "images": images, "stages": stages}, indent=1))


if __name__ == "__main__":
    main()
