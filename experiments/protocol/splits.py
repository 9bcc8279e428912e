"""The protocol's class splits: train / val / test = 50% / 25% / 25% of each data set's classes, by a fixed seed.

The files under ``splits/`` are committed; this module regenerates them from the installed packages and compares:

    python experiments/protocol/splits.py write            # (re)write splits/{fonts,clipart}.json
    python experiments/protocol/splits.py check            # regenerate in memory: same as the committed files?

Rule (no numpy, so no generator version can move a class): sort the class names by
``sha256(f"{seed}:{name}")``; the first ``round(n / 2)`` are train, the next ``round(n / 4)`` val, the rest test;
each list is then stored sorted by name.

* fonts: class = a font of Debian's ``fonts-aenigma`` that renders usable glyphs at 64 px
  (``distpddm.data.glyphs.load_glyphs(size=64)``, the product's renderer; 62 glyphs per class).
* clipart: class = a leaf folder (no sub-folder) of Debian's ``openclipart-png`` holding >= 10 PNG images; its
  name is the folder's path under the root with ``/`` written ``__`` (``animals__birds__penguin``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPLITS_DIR = HERE / "splits"
SEED = 23  # the number; fixed once, never tuned
FRACTIONS = {"train": 0.5, "val": 0.25, "test": 0.25}
SPLITS = tuple(FRACTIONS)
DATASETS = ("fonts", "clipart")

FONTS_DIR = Path("/usr/share/fonts/truetype/aenigma")
FONTS_PACKAGE = "fonts-aenigma"
FONT_SIZE = 64
CLIPART_DIR = Path("/usr/share/openclipart/png")
CLIPART_PACKAGE = "openclipart-png"
CLIPART_MIN_IMAGES = 10
SEP = "__"  # clip art: '/' of a folder path in a class name


def package_version(package: str) -> str | None:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        return None
    return out.stdout.strip() or None


def clipart_folders(root: Path = CLIPART_DIR, min_images: int = CLIPART_MIN_IMAGES) -> dict[str, Path]:
    """Class name -> leaf folder, for every leaf folder under ``root`` with at least ``min_images`` PNGs."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root} not found: apt-get install openclipart-png")
    found = {}
    for folder, subs, files in os.walk(root):
        if subs:
            continue
        if sum(f.lower().endswith(".png") for f in files) >= min_images:
            rel = Path(folder).relative_to(root).as_posix()
            found[rel.replace("/", SEP)] = Path(folder)
    return dict(sorted(found.items()))


def clipart_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(".png"))


def font_files(root: Path = FONTS_DIR) -> dict[str, Path]:
    """Font stem (the product's class name) -> font file."""
    from distpddm.data.glyphs import find_fonts

    return {f.stem: f for f in find_fonts([root])}


def font_classes(root: Path = FONTS_DIR) -> list[str]:
    """The fonts that render at 64 px (rendered once, then read from the product's glyph cache)."""
    from distpddm.data.glyphs import load_glyphs

    return sorted(load_glyphs([root], size=FONT_SIZE).class_names)


def assign(classes: list[str], seed: int = SEED) -> dict[str, list[str]]:
    """The 50 / 25 / 25 split of ``classes`` (see the module's rule)."""
    if len(set(classes)) != len(classes):
        raise ValueError("class names must be unique")
    order = sorted(classes, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
    n = len(order)
    n_train, n_val = round(n * FRACTIONS["train"]), round(n * FRACTIONS["val"])
    return {
        "train": sorted(order[:n_train]),
        "val": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }


def make(dataset: str, seed: int = SEED) -> dict:
    """The split record of ``dataset`` as committed under ``splits/``."""
    if dataset == "fonts":
        classes = font_classes()
        source, package = str(FONTS_DIR), FONTS_PACKAGE
        images = dict.fromkeys(classes, 62)
        rule = f"class = a font of {FONTS_PACKAGE} that renders at {FONT_SIZE} px (62 glyphs each)"
    elif dataset == "clipart":
        folders = clipart_folders()
        classes = list(folders)
        source, package = str(CLIPART_DIR), CLIPART_PACKAGE
        images = {c: len(clipart_images(f)) for c, f in folders.items()}
        rule = (
            f"class = a leaf folder of {CLIPART_PACKAGE} with >= {CLIPART_MIN_IMAGES} PNG images; "
            f"name = its path under the source with '/' written '{SEP}'"
        )
    else:
        raise ValueError(f"unknown dataset {dataset!r} (one of {', '.join(DATASETS)})")
    parts = assign(classes, seed)
    return {
        "dataset": dataset,
        "seed": seed,
        "rule": rule,
        "split_rule": "sort classes by sha256(f'{seed}:{name}'); first round(n/2) train, next round(n/4) val, "
        "rest test; each list sorted by name",
        "source": source,
        "package": package,
        "package_version": package_version(package),
        "counts": {s: len(parts[s]) for s in SPLITS},
        "images": {s: sum(images[c] for c in parts[s]) for s in SPLITS},
        **parts,
    }


def path(dataset: str) -> Path:
    return SPLITS_DIR / f"{dataset}.json"


def load(dataset: str) -> dict:
    return json.loads(path(dataset).read_text())


def check(record: dict, classes: list[str] | None = None) -> None:
    """Raise ValueError unless train / val / test are disjoint (and, given ``classes``, cover exactly them)."""
    seen: dict[str, str] = {}
    for split in SPLITS:
        for c in record[split]:
            if c in seen:
                raise ValueError(f"{record['dataset']}: class {c!r} is in both {seen[c]} and {split}")
            seen[c] = split
        if record["counts"][split] != len(record[split]):
            raise ValueError(f"{record['dataset']}: counts[{split}] != {len(record[split])}")
    if classes is not None and set(seen) != set(classes):
        missing, extra = set(classes) - set(seen), set(seen) - set(classes)
        raise ValueError(f"{record['dataset']}: {len(missing)} class(es) in no split, {len(extra)} unknown")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("write", "check"))
    p.add_argument("--dataset", choices=DATASETS, nargs="*", default=list(DATASETS))
    args = p.parse_args(argv)
    bad = 0
    for dataset in args.dataset:
        record = make(dataset)
        check(record, [c for s in SPLITS for c in record[s]])
        if args.action == "write":
            SPLITS_DIR.mkdir(parents=True, exist_ok=True)
            path(dataset).write_text(json.dumps(record, indent=1) + "\n")
            print(f"{dataset}: {record['counts']} classes, {record['images']} images -> {path(dataset)}")
        else:
            committed = load(dataset)
            check(committed)
            same = {k: v for k, v in record.items() if k != "package_version"} == {
                k: v for k, v in committed.items() if k != "package_version"
            }
            if committed.get("package_version") != record["package_version"]:
                print(f"{dataset}: note: package {committed['package_version']} -> {record['package_version']}")
            print(f"{dataset}: {'same as' if same else 'DIFFERS FROM'} {path(dataset)}")
            bad += not same
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent.parent))  # the checkout's distpddm when run as a script
    sys.exit(main())
