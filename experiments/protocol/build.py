"""Shards of exactly the protocol's class sets, built by the product (``distpddm shards build --source folder``).

    python experiments/protocol/build.py fonts clipart     # -> shards/out/protocol/<dataset>/{train,val,test}

The product's builder cannot take these class sets directly: ``--source fonts`` always splits the fonts 50 / 50
into train / test by its seed (and ``--holdout-classes`` carves only from that train split), and ``--source
folder`` stores RGBA clip art as it is, which every reader then decodes with its transparent pixels black (PIL's
and TorchCodec's ``convert("RGB")`` drop the alpha channel: no compositing). So this script first writes a
folder ``<root>/<dataset>-src/{train,val,test}/<class>/*.png`` of the split file's classes, then runs the
product's builder on it once (its ``train`` / ``val`` / ``test`` sub-folders become the three splits):

* fonts: the glyphs of the product's own renderer (``distpddm.data.glyphs.load_glyphs``, 64 px, cached), one
  RGB PNG per glyph, the bytes ``--source fonts`` would store.
* clipart: each PNG composited onto white, its longer side brought down to at most 256 px (Lanczos), RGB PNG;
  val and test keep at most ``CLIPART_EVAL_CAP`` (50) images per class, a seeded draw (see :func:`capped`).

Idempotent: ``<root>/<dataset>/protocol.json`` records what was built (the split file's digest and the options);
a rerun with the same finds it and does nothing, anything else rebuilds both folders from scratch.
``--limit-classes N`` (tests): only the first N classes of each split.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

import splits  # noqa: E402

DEFAULT_ROOT = REPO / "shards" / "out" / "protocol"
CLIPART_MAX_SIDE = 256
#: Images per class in the clip art's val and test splits (train keeps every image: its long tail is real).
#: Without a cap one class, ``shapes__stars``, is 1,378 of val's 2,105 images, and image-averaged Recall@1
#: would mostly measure it. Capping at build time keeps every figure one that ``distpddm eval`` reports.
CLIPART_EVAL_CAP = 50
CAP_SEED = 23
SHARD_SIZE = "64M"
#: Clip art: chunks of 4, the product's default when its tuning records ran (at 38 classes a ready class holds
#: several chunks anyway: docs/benchmarks.md, "Positive pairs"). Fonts, none run yet: the default since, 2 K.
CHUNK_SIZE = {"clipart": 4, "fonts": 8}
STAMP = "protocol.json"
VERSION = 2


def product_cli() -> list[str]:
    """The product's command line, from this interpreter (the checkout's venv)."""
    return [sys.executable, "-m", "distpddm.cli"]


def shards_dir(dataset: str, root: Path = DEFAULT_ROOT) -> Path:
    return Path(root) / dataset


def source_dir(dataset: str, root: Path = DEFAULT_ROOT) -> Path:
    return Path(root) / f"{dataset}-src"


def chosen_classes(record: dict, limit: int | None) -> dict[str, list[str]]:
    return {s: record[s][:limit] if limit else list(record[s]) for s in splits.SPLITS}


def _composite(job: tuple[str, str]) -> None:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # a few clip art PNGs are > 100 MP; they are trusted package files
    src, dst = job
    with Image.open(src) as img:
        img.load()
        rgba = img.convert("RGBA")
    rgba.thumbnail((CLIPART_MAX_SIDE, CLIPART_MAX_SIDE), Image.LANCZOS)  # only ever shrinks
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    Image.alpha_composite(white, rgba).convert("RGB").save(dst, format="PNG")


def capped(images: list[Path], cap: int | None, name: str) -> list[Path]:
    """At most ``cap`` of a class's images, drawn by a seed of the class name alone (so a class keeps its
    draw whatever else changes), in file-name order."""
    if cap is None or len(images) <= cap:
        return images
    import numpy as np

    seed = int.from_bytes(hashlib.sha256(f"{CAP_SEED}:{name}".encode()).digest()[:8], "little")
    keep = np.random.default_rng(seed).choice(len(images), cap, replace=False)
    return [images[i] for i in sorted(keep.tolist())]


def prepare_clipart(classes: dict[str, list[str]], out: Path, workers: int) -> int:
    folders = splits.clipart_folders()
    jobs = []
    for split, names in classes.items():
        cap = None if split == "train" else CLIPART_EVAL_CAP
        for name in names:
            dest = out / split / name
            dest.mkdir(parents=True, exist_ok=True)
            jobs += [(str(p), str(dest / p.name)) for p in capped(splits.clipart_images(folders[name]), cap, name)]
    with ProcessPoolExecutor(workers) as pool:
        for n, _ in enumerate(pool.map(_composite, jobs, chunksize=16), 1):
            if n % 500 == 0 or n == len(jobs):
                print(f"  composited {n} / {len(jobs)} clip art images", flush=True)
    return len(jobs)


def prepare_fonts(classes: dict[str, list[str]], out: Path) -> int:
    from PIL import Image

    from distpddm.data.glyphs import GLYPHS, load_glyphs

    glyphs = load_glyphs([splits.FONTS_DIR], size=splits.FONT_SIZE)
    position = {name: n for n, name in enumerate(glyphs.class_names)}
    written = 0
    for split, names in classes.items():
        for name in names:
            dest = out / split / name
            dest.mkdir(parents=True, exist_ok=True)
            first = position[name] * len(GLYPHS)
            for g in range(len(GLYPHS)):  # by index: glyph file names must not differ by case alone
                Image.fromarray(glyphs.images[first + g]).convert("RGB").save(dest / f"{g:02d}.png", format="PNG")
            written += len(GLYPHS)
    return written


def build(
    dataset: str, root: Path = DEFAULT_ROOT, limit: int | None = None, workers: int | None = None, quiet=False
) -> Path:
    """The three split folders of ``dataset`` under ``root``, built once; returns ``root/dataset``."""
    record = splits.load(dataset)
    splits.check(record)
    out, src = shards_dir(dataset, root), source_dir(dataset, root)
    stamp = {
        "version": VERSION,
        "dataset": dataset,
        "split_file_sha256": hashlib.sha256(splits.path(dataset).read_bytes()).hexdigest(),
        "limit_classes": limit,
        "clipart_max_side": CLIPART_MAX_SIDE if dataset == "clipart" else None,
        "clipart_eval_cap": CLIPART_EVAL_CAP if dataset == "clipart" else None,
        "font_size": splits.FONT_SIZE if dataset == "fonts" else None,
        "chunk_size": CHUNK_SIZE[dataset],
    }
    done = out / STAMP
    built = all((out / s / "index.json").exists() for s in splits.SPLITS)
    if built and done.exists() and json.loads(done.read_text()).get("build") == stamp:
        print(f"{dataset}: already built in {out} (delete {done} to rebuild)")
        return out
    for folder in (out, src):
        if folder.exists():
            shutil.rmtree(folder)
    classes = chosen_classes(record, limit)
    workers = workers or os.cpu_count() or 1
    print(f"{dataset}: writing the split folders under {src}", flush=True)
    n = prepare_fonts(classes, src) if dataset == "fonts" else prepare_clipart(classes, src, workers)
    print(f"{dataset}: {n} images in {', '.join(f'{s} {len(c)}' for s, c in classes.items())} classes", flush=True)
    cmd = [
        *product_cli(),
        "shards",
        "build",
        "--source",
        "folder",
        str(src),
        str(out),
        "--shard-size",
        SHARD_SIZE,
        "--chunk-size",
        str(CHUNK_SIZE[dataset]),
        "--workers",
        str(workers),
        "--rescan",
    ]
    if quiet:
        cmd.append("--quiet")
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    for split, names in classes.items():  # the product's class lists are the split file's
        built = json.loads((out / split / "index.json").read_text())["classes"]
        if sorted(built) != sorted(names):
            raise RuntimeError(f"{out / split}: classes differ from {splits.path(dataset)}")
    done.write_text(json.dumps({"build": stamp, "command": cmd}, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("datasets", nargs="+", choices=splits.DATASETS)
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"default {DEFAULT_ROOT}")
    p.add_argument("--limit-classes", type=int, help="only the first N classes of each split (tests)")
    p.add_argument("--workers", type=int, help="processes (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar from the builder")
    args = p.parse_args(argv)
    for dataset in args.datasets:
        build(dataset, args.root, args.limit_classes, args.workers, args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
