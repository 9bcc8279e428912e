"""Source layouts the shard builder reads: one function per dataset layout, all returning the same plan.

A plan lists, per split, every sample (the path its bytes come from, its label, its size on disk) and the
class list of that split, in columns (a list of paths, numpy labels and sizes): at ImageNet-10K scale a
plan holds 9M samples. Labels are indices into the split's own class list, so class-disjoint splits (CUB,
CARS196, SOP) each start at 0. Class folders are listed and sized in parallel (threads: the work is file
system calls); reading a layout never decodes an image: building is where bytes are read.

:func:`carve` cuts the splits evaluation protocols need from a source that has none: a seeded per-class
validation split (closed set) and held-out classes (open set / transfer).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .images import IMAGE_EXTENSIONS

KINDS = ("imagenet", "cub", "cars", "sop", "folder", "fonts")


class SourceError(ValueError):
    """The source folder does not look like the layout named; the message says what is missing."""


def _scan_threads() -> int:
    return min(32, 4 * (os.cpu_count() or 1))


@dataclass
class SplitPlan:
    classes: list[str]
    sources: list[str] = field(default_factory=list)  # paths relative to the source root (fonts: font#glyph)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    sizes: np.ndarray | None = None  # bytes on disk of each source file, where listed

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int32)
        if len(self.labels) != len(self.sources):
            raise ValueError(f"{len(self.sources)} sources but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.sources)

    def class_counts(self) -> list[int]:
        return np.bincount(self.labels, minlength=len(self.classes)).tolist()

    def take(self, rows: np.ndarray, classes: list[str] | None = None, labels: np.ndarray | None = None) -> SplitPlan:
        """The given rows, optionally with a new class list and the rows' new labels."""
        return SplitPlan(
            classes if classes is not None else self.classes,
            [self.sources[i] for i in rows],
            self.labels[rows] if labels is None else labels,
            None if self.sizes is None else self.sizes[rows],
        )


@dataclass
class SourcePlan:
    kind: str
    root: Path
    splits: dict[str, SplitPlan]
    #: Reads one source's bytes and file extension; default: the file at root / source.
    reader: Callable[[str], tuple[bytes, str]] | None = None
    carving: dict = field(default_factory=dict)  # how splits were carved (recorded in index.json)

    def read(self, source: str) -> tuple[bytes, str]:
        if self.reader is not None:
            return self.reader(source)
        path = self.root / source
        return path.read_bytes(), path.suffix.lower().lstrip(".")


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise SourceError(f"{what} not found: {path}")
    return path


def _is_image(name: str) -> bool:
    return name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS


def _list_images(folder: str) -> list[tuple[str, int]]:
    """(file name, bytes) of the images in one folder, sorted: one ``scandir`` pass, one ``stat`` per file."""
    with os.scandir(folder) as entries:
        found = [(e.name, e.stat().st_size) for e in entries if _is_image(e.name) and e.is_file()]
    found.sort()
    return found


def _parallel(fn, args: Sequence, desc: str, progress: bool) -> list:
    with ThreadPoolExecutor(_scan_threads()) as pool:
        return list(tqdm(pool.map(fn, args), total=len(args), desc=desc, unit="dir", disable=not progress))


def _sizes(root: Path, sources: list[str], progress: bool = False) -> np.ndarray:
    """File sizes, stat'ed in parallel (in blocks, so the threads do not each take one tiny call)."""
    blocks = [sources[i : i + 4096] for i in range(0, len(sources), 4096)]

    def stat(block: list[str]) -> list[int]:
        return [os.stat(root / s).st_size for s in block]

    try:
        sized = _parallel(stat, blocks, "size", progress)
    except FileNotFoundError as e:
        raise SourceError(f"listed image not found: {e.filename}") from None
    return np.array([s for block in sized for s in block], dtype=np.int64)


def _split_from_entries(root: Path, entries: Iterable[tuple[str, str]], progress: bool = False) -> SplitPlan:
    """``(relative path, class name)`` pairs -> a split whose labels follow the sorted class names."""
    entries = list(entries)
    classes = sorted({c for _, c in entries})
    index = {c: n for n, c in enumerate(classes)}
    sources = [p for p, _ in entries]
    labels = np.array([index[c] for _, c in entries], dtype=np.int32)
    return SplitPlan(classes, sources, labels, _sizes(root, sources, progress))


def folder_split(root: Path, classes: list[str] | None = None, prefix: str = "", progress: bool = False) -> SplitPlan:
    """One sub-folder per class; ``classes`` (a synset list, say) fixes the order and which are kept.
    Sources are ``<prefix>/<class>/<file>``."""
    _need(root, "class folder root")
    if classes is None:
        with os.scandir(root) as entries:
            classes = sorted(e.name for e in entries if e.is_dir())
    if not classes:
        raise SourceError(f"no class folders under {root}")
    missing = [c for c in classes if not (root / c).is_dir()]
    if missing:
        raise SourceError(f"class folder for {missing[0]!r} not found under {root} ({len(missing)} missing)")
    listed = _parallel(_list_images, [str(root / c) for c in classes], f"scan {root.name}", progress)
    lead = f"{prefix}/" if prefix else ""
    sources = [f"{lead}{c}/{name}" for c, files in zip(classes, listed, strict=True) for name, _ in files]
    labels = np.repeat(np.arange(len(classes), dtype=np.int32), [len(files) for files in listed])
    sizes = np.fromiter((s for files in listed for _, s in files), dtype=np.int64, count=len(sources))
    return SplitPlan(list(classes), sources, labels, sizes)


def read_imagenet(root: Path, synsets: Path | None = None, progress: bool = False) -> dict[str, SplitPlan]:
    """``train/<wnid>/*.JPEG`` (and ``val/<wnid>/...`` where present); ``synsets``: one wnid per line."""
    order = None
    if synsets is not None:
        order = [line.split()[0] for line in _need(synsets, "synset list").read_text().splitlines() if line.strip()]
    splits = {"train": folder_split(_need(root / "train", "train/ folder"), order, "train", progress)}
    if (root / "val").is_dir():
        splits["val"] = folder_split(root / "val", order or splits["train"].classes, "val", progress)
    return splits


def read_cub(root: Path, progress: bool = False) -> dict[str, SplitPlan]:
    """CUB_200_2011: classes 1-100 train, 101-200 test (the metric-learning protocol)."""
    images = dict(line.split(maxsplit=1) for line in _need(root / "images.txt", "images.txt").read_text().splitlines())
    labels = dict(line.split() for line in _need(root / "image_class_labels.txt", "labels").read_text().splitlines())
    names = dict(line.split(maxsplit=1) for line in _need(root / "classes.txt", "classes.txt").read_text().splitlines())
    by_split: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for image_id, rel in sorted(images.items(), key=lambda kv: int(kv[0])):
        cls = int(labels[image_id])
        by_split["train" if cls <= 100 else "test"].append((f"images/{rel.strip()}", names[str(cls)].strip()))
    return {s: _split_from_entries(root, e, progress) for s, e in by_split.items() if e}


def read_cars(root: Path, progress: bool = False) -> dict[str, SplitPlan]:
    """CARS196 ``cars_annos.mat``: classes 1-98 train, 99-196 test."""
    from scipy.io import loadmat

    mat = loadmat(str(_need(root / "cars_annos.mat", "cars_annos.mat")))
    names = [str(n[0]) if hasattr(n, "__len__") and len(n) else str(n) for n in mat["class_names"].ravel()]
    by_split: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for ann in mat["annotations"].ravel():
        rel = str(ann["relative_im_path"].ravel()[0])
        cls = int(ann["class"].ravel()[0])
        by_split["train" if cls <= 98 else "test"].append((rel, names[cls - 1]))
    return {s: _split_from_entries(root, e, progress) for s, e in by_split.items() if e}


def read_sop(root: Path, progress: bool = False) -> dict[str, SplitPlan]:
    """Stanford Online Products: ``Ebay_train.txt`` / ``Ebay_test.txt`` (image_id class_id super_id path)."""
    splits = {}
    for split, name in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        lines = _need(root / name, name).read_text().splitlines()[1:]
        entries = [(parts[3], f"product_{int(parts[1]):05d}") for parts in (ln.split() for ln in lines) if parts]
        splits[split] = _split_from_entries(root, entries, progress)
    return splits


def read_folder(root: Path, progress: bool = False) -> dict[str, SplitPlan]:
    """``<split>/<class>/*`` where split folders exist (train, val, test), else ``<class>/*`` as train."""
    present = [s for s in ("train", "val", "test") if (root / s).is_dir()]
    if present:
        return {s: folder_split(root / s, None, s, progress) for s in present}
    return {"train": folder_split(root, None, "", progress)}


def read_fonts(
    font_dirs: list[Path] | None, size: int = 64, test_fraction: float = 0.5, seed: int = 0
) -> tuple[dict[str, SplitPlan], Callable[[str], tuple[bytes, str]], Path]:
    """62 glyphs of every font that renders (class = font), class-disjoint train / test, stored as PNG."""
    from .glyphs import GLYPHS, find_fonts, load_glyphs

    fonts = find_fonts(font_dirs)
    root = Path(os.path.commonpath([str(f.parent) for f in fonts]))
    glyphs = load_glyphs(font_dirs, size=size)  # cached; fonts that do not render are already dropped
    train, test = glyphs.split(test_fraction, seed=seed)
    splits = {}
    for split, part in (("train", train), ("test", test)):
        sources = [f"{name}#{ch}" for name in part.class_names for ch in GLYPHS]
        labels = np.repeat(np.arange(len(part.class_names)), len(GLYPHS))
        splits[split] = SplitPlan(list(part.class_names), sources, labels)
    position = {name: n for n, name in enumerate(glyphs.class_names)}

    def read(source: str) -> tuple[bytes, str]:
        from PIL import Image

        name, ch = source.rsplit("#", 1)
        image = glyphs.images[position[name] * len(GLYPHS) + GLYPHS.index(ch)]
        buf = io.BytesIO()
        Image.fromarray(image).convert("RGB").save(buf, format="PNG")
        return buf.getvalue(), "png"

    return {s: p for s, p in splits.items() if len(p)}, read, root


def read_source(
    kind: str,
    root: Path | None,
    *,
    synsets: Path | None = None,
    fonts: list[Path] | None = None,
    font_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> SourcePlan:
    """The plan for a source folder of layout ``kind`` (one of :data:`KINDS`; published shards indexed in place
    are :func:`.wdsbuild.read_wds_index`'s)."""
    if kind not in KINDS:
        raise SourceError(f"unknown source kind {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "fonts":
        dirs = ([root] if root is not None else []) + list(fonts or [])
        splits, reader, font_root = read_fonts(dirs or None, font_size, seed=seed)
        return SourcePlan(kind, font_root, splits, reader)
    if root is None:
        raise SourceError(f"source kind {kind!r} needs a source folder")
    root = _need(Path(root), "source folder")
    readers = {
        "imagenet": lambda: read_imagenet(root, synsets, progress),
        "cub": lambda: read_cub(root, progress),
        "cars": lambda: read_cars(root, progress),
        "sop": lambda: read_sop(root, progress),
        "folder": lambda: read_folder(root, progress),
    }
    splits = readers[kind]()
    empty = [s for s, p in splits.items() if not len(p)]
    if not splits or empty:
        raise SourceError(f"no images found for split(s) {empty or 'any'} under {root} (layout {kind!r})")
    return SourcePlan(kind, root, splits)


# ------------------------------------------------------------------------------------------------ carving


def parse_holdout(spec: str | None) -> float | list[str] | None:
    """``--holdout-classes``: a fraction in (0, 1), a file with one class name per line, or comma-separated
    names."""
    if spec is None:
        return None
    try:
        fraction = float(spec)
    except ValueError:
        path = Path(spec)
        if path.is_file():
            return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
        return [name.strip() for name in spec.split(",") if name.strip()]
    if not 0 < fraction < 1:
        raise SourceError(f"--holdout-classes fraction must be in (0, 1), got {fraction}")
    return fraction


def choose_holdout(
    classes: list[str], holdout: float | list[str], rng: np.random.Generator, carving: dict
) -> list[int]:
    """The held-out classes' positions in ``classes`` (sorted): a fraction drawn from ``rng``, or the names
    given. One function for the builder and the in-place indexer, so both carve alike from the same seed."""
    if isinstance(holdout, float):
        n_held = int(round(holdout * len(classes)))
        if not 1 <= n_held < len(classes):
            raise SourceError(
                f"--holdout-classes {holdout} of {len(classes)} classes holds out {n_held}: "
                "need at least one, and at least one left to train on"
            )
        carving["holdout_fraction"] = holdout
        return sorted(rng.choice(len(classes), n_held, replace=False).tolist())
    position = {c: n for n, c in enumerate(classes)}
    unknown = [c for c in holdout if c not in position]
    if unknown:
        raise SourceError(
            f"--holdout-classes names {len(unknown)} class(es) the train split does not have: {', '.join(unknown[:5])}"
        )
    held = sorted({position[c] for c in holdout})
    if len(held) == len(classes):
        raise SourceError("--holdout-classes names every class: none would be left to train on")
    return held


def choose_val(labels: np.ndarray, n_classes: int, val_per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Which samples go to ``val``: ``min(val_per_class, n // 2)`` drawn from each class of n samples."""
    if val_per_class < 1:
        raise SourceError(f"--val-per-class must be >= 1, got {val_per_class}")
    to_val = np.zeros(len(labels), dtype=bool)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(n_classes + 1))
    for c in range(n_classes):
        members = order[bounds[c] : bounds[c + 1]]
        take = min(val_per_class, len(members) // 2)
        if take:
            to_val[rng.choice(members, take, replace=False)] = True
    return to_val


def carve(
    plan: SourcePlan, val_per_class: int | None = None, holdout: float | list[str] | None = None, seed: int = 0
) -> SourcePlan:
    """Held-out classes (every image of them, from every split holding a class of that name) into a
    ``holdout`` split, then ``val_per_class`` images of each remaining class from ``train`` into ``val``
    (``min(N, n // 2)`` for a class of n images, so every class keeps training images). Seeded; the
    record of how goes to ``plan.carving``."""
    if val_per_class is None and holdout is None:
        return plan
    if "train" not in plan.splits:
        raise SourceError("carving needs a train split")
    splits = dict(plan.splits)
    train = splits["train"]
    rng = np.random.default_rng(seed)
    carving: dict = {"seed": seed}
    if holdout is not None:
        for name in ("holdout",):
            if name in splits:
                raise SourceError(f"the source already has a {name!r} split; do not carve another")
        held = choose_holdout(train.classes, holdout, rng, carving)
        held_classes = [train.classes[n] for n in held]
        position = {c: n for n, c in enumerate(held_classes)}
        held_parts = []
        for name, part in list(splits.items()):  # by name: a val split may list its classes on its own
            to_held = np.array([position.get(c, -1) for c in part.classes])  # old label -> holdout label
            is_held = to_held >= 0
            if not is_held.any():
                continue
            out = is_held[part.labels]
            held_parts.append(part.take(np.flatnonzero(out), labels=to_held[part.labels[out]]))
            rows = np.flatnonzero(~out)
            kept = [c for c, h in zip(part.classes, is_held, strict=True) if not h]
            new_label = np.cumsum(~is_held) - 1  # old label -> label among the kept classes
            splits[name] = part.take(rows, kept, new_label[part.labels[rows]])
        splits["holdout"] = _concat(held_classes, held_parts)
        carving["holdout_classes"] = len(held_classes)
        train = splits["train"]
    if val_per_class is not None:
        if "val" in splits:
            raise SourceError("the source already has a val split; --val-per-class carves one only where none is")
        to_val = choose_val(train.labels, len(train.classes), val_per_class, rng)
        splits["val"] = train.take(np.flatnonzero(to_val))
        splits["train"] = train.take(np.flatnonzero(~to_val))
        carving["val_per_class"] = val_per_class
    return SourcePlan(plan.kind, plan.root, splits, plan.reader, carving)


def _concat(classes: list[str], parts: list[SplitPlan]) -> SplitPlan:
    sizes = None if any(p.sizes is None for p in parts) else np.concatenate([p.sizes for p in parts])
    return SplitPlan(classes, [s for p in parts for s in p.sources], np.concatenate([p.labels for p in parts]), sizes)


# ------------------------------------------------------------------------------------- the plan on disk


PLAN_FILE = "plan.npz"


def save_plan(plan: SourcePlan, path: Path, key: dict) -> None:
    """The listed source (before carving), written once, atomically: per split the paths (one newline-joined
    block), labels and sizes, and a JSON header naming what was listed (``key``). A rerun with the same key
    reads it back instead of listing millions of files again."""
    import json

    header = {
        "version": 2,
        "key": key,
        "kind": plan.kind,
        "splits": {s: {"classes": p.classes, "samples": len(p)} for s, p in plan.splits.items()},
    }
    arrays = {"header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)}
    for n, (name, part) in enumerate(plan.splits.items()):
        if any("\n" in source for source in part.sources):
            raise SourceError(f"a file name in split {name!r} holds a newline; rename it")
        joined = "\n".join(part.sources).encode(errors="surrogateescape")  # names need not be UTF-8
        arrays[f"sources{n}"] = np.frombuffer(joined, dtype=np.uint8)
        arrays[f"labels{n}"] = part.labels
        arrays[f"sizes{n}"] = part.sizes if part.sizes is not None else np.full(len(part), -1, np.int64)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def load_plan(path: Path, key: dict, root: Path) -> SourcePlan | None:
    """The plan saved at ``path`` if it was made for ``key``, else None."""
    import json

    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            header = json.loads(data["header"].tobytes())
            if header.get("version") != 2 or header.get("key") != key:
                return None
            splits = {}
            for n, (name, meta) in enumerate(header["splits"].items()):
                joined = data[f"sources{n}"].tobytes().decode(errors="surrogateescape")
                sources = joined.split("\n") if meta["samples"] else []
                sizes = data[f"sizes{n}"]
                splits[name] = SplitPlan(
                    meta["classes"], sources, data[f"labels{n}"], None if (sizes < 0).any() else sizes
                )
    except Exception:  # noqa: BLE001 -- damaged or from another version: list the source again
        return None
    return SourcePlan(header["kind"], root, splits)


def listed_source(
    kind: str,
    root: Path | None,
    out: Path,
    *,
    synsets: Path | None = None,
    fonts: list[Path] | None = None,
    font_size: int = 64,
    seed: int = 0,
    rescan: bool = False,
    progress: bool = False,
) -> SourcePlan:
    """:func:`read_source`, through ``OUT/plan.npz``: the first build lists the source and saves the
    listing there, a rerun (after a crash, or to add splits) reads it back."""
    import hashlib
    import logging

    if kind == "fonts" or root is None:  # rendered in process: nothing worth keeping
        return read_source(kind, root, fonts=fonts, font_size=font_size, seed=seed, progress=progress)
    root = _need(Path(root), "source folder").resolve()
    key = {"kind": kind, "root": str(root)}
    if synsets is not None:
        key["synsets"] = hashlib.sha256(_need(Path(synsets), "synset list").read_bytes()).hexdigest()[:16]
    path = Path(out) / PLAN_FILE
    if not rescan:
        plan = load_plan(path, key, root)
        if plan is not None:
            logging.getLogger("distpddm.data").info(
                "reusing the source listing in %s (%d images); --rescan lists %s again",
                path,
                sum(len(p) for p in plan.splits.values()),
                root,
            )
            return plan
    plan = read_source(kind, root, synsets=synsets, progress=progress)
    Path(out).mkdir(parents=True, exist_ok=True)
    save_plan(plan, path, key)
    return plan
