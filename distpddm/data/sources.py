"""Source layouts the shard builder reads: one function per dataset layout, all returning the same plan.

A plan lists, per split, every sample (where its bytes come from, its label and class name) and the class
list of that split. Labels are indices into the split's own class list, so class-disjoint splits (CUB,
CARS196, SOP) each start at 0. Reading a layout never decodes an image: building is where bytes are read.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".JPEG", ".JPG", ".PNG")
KINDS = ("imagenet", "cub", "cars", "sop", "folder", "fonts")


class SourceError(ValueError):
    """The source folder does not look like the layout named; the message says what is missing."""


@dataclass(frozen=True)
class SourceItem:
    source: str  # path relative to the source root (fonts: "<font file>#<glyph>")
    label: int
    class_name: str


@dataclass
class SplitPlan:
    classes: list[str]
    items: list[SourceItem] = field(default_factory=list)


@dataclass
class SourcePlan:
    kind: str
    root: Path
    splits: dict[str, SplitPlan]
    #: Reads one item's bytes and file extension; default: the file at root / item.source.
    reader: Callable[[SourceItem], tuple[bytes, str]] | None = None

    def read(self, item: SourceItem) -> tuple[bytes, str]:
        if self.reader is not None:
            return self.reader(item)
        path = self.root / item.source
        return path.read_bytes(), path.suffix.lower().lstrip(".")


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise SourceError(f"{what} not found: {path}")
    return path


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in IMAGE_SUFFIXES)


def _split_from_items(root: Path, entries: Iterable[tuple[str, str]]) -> SplitPlan:
    """``(relative path, class name)`` pairs -> a split whose labels follow the sorted class names."""
    entries = list(entries)
    classes = sorted({c for _, c in entries})
    index = {c: n for n, c in enumerate(classes)}
    return SplitPlan(classes, [SourceItem(p, index[c], c) for p, c in entries])


def folder_split(root: Path, classes: list[str] | None = None) -> SplitPlan:
    """One sub-folder per class; ``classes`` (a synset list, say) fixes the order and which are kept."""
    _need(root, "class folder root")
    names = classes if classes is not None else sorted(d.name for d in root.iterdir() if d.is_dir())
    if not names:
        raise SourceError(f"no class folders under {root}")
    items = []
    for label, name in enumerate(names):
        folder = _need(root / name, f"class folder for {name!r}")
        items += [SourceItem(str(p.relative_to(root)), label, name) for p in _images_in(folder)]
    return SplitPlan(list(names), items)


def _rebase(split: SplitPlan, prefix: str) -> SplitPlan:
    return SplitPlan(split.classes, [SourceItem(f"{prefix}/{i.source}", i.label, i.class_name) for i in split.items])


def read_imagenet(root: Path, synsets: Path | None = None) -> dict[str, SplitPlan]:
    """``train/<wnid>/*.JPEG`` (and ``val/<wnid>/...`` where present); ``synsets``: one wnid per line."""
    order = None
    if synsets is not None:
        order = [line.split()[0] for line in _need(synsets, "synset list").read_text().splitlines() if line.strip()]
    splits = {"train": _rebase(folder_split(_need(root / "train", "train/ folder"), order), "train")}
    if (root / "val").is_dir():
        val = folder_split(root / "val", order or splits["train"].classes)
        splits["val"] = _rebase(val, "val")
    return splits


def read_cub(root: Path) -> dict[str, SplitPlan]:
    """CUB_200_2011: classes 1-100 train, 101-200 test (the metric-learning protocol)."""
    images = dict(line.split(maxsplit=1) for line in _need(root / "images.txt", "images.txt").read_text().splitlines())
    labels = dict(line.split() for line in _need(root / "image_class_labels.txt", "labels").read_text().splitlines())
    names = dict(line.split(maxsplit=1) for line in _need(root / "classes.txt", "classes.txt").read_text().splitlines())
    by_split: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for image_id, rel in sorted(images.items(), key=lambda kv: int(kv[0])):
        cls = int(labels[image_id])
        by_split["train" if cls <= 100 else "test"].append((f"images/{rel.strip()}", names[str(cls)].strip()))
    return {s: _split_from_items(root, e) for s, e in by_split.items() if e}


def read_cars(root: Path) -> dict[str, SplitPlan]:
    """CARS196 ``cars_annos.mat``: classes 1-98 train, 99-196 test."""
    from scipy.io import loadmat

    mat = loadmat(str(_need(root / "cars_annos.mat", "cars_annos.mat")))
    names = [str(n[0]) if hasattr(n, "__len__") and len(n) else str(n) for n in mat["class_names"].ravel()]
    by_split: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    for ann in mat["annotations"].ravel():
        rel = str(ann["relative_im_path"].ravel()[0])
        cls = int(ann["class"].ravel()[0])
        by_split["train" if cls <= 98 else "test"].append((rel, names[cls - 1]))
    return {s: _split_from_items(root, e) for s, e in by_split.items() if e}


def read_sop(root: Path) -> dict[str, SplitPlan]:
    """Stanford Online Products: ``Ebay_train.txt`` / ``Ebay_test.txt`` (image_id class_id super_id path)."""
    splits = {}
    for split, name in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        lines = _need(root / name, name).read_text().splitlines()[1:]
        entries = [(parts[3], f"product_{int(parts[1]):05d}") for parts in (ln.split() for ln in lines) if parts]
        splits[split] = _split_from_items(root, entries)
    return splits


def read_folder(root: Path) -> dict[str, SplitPlan]:
    """``<split>/<class>/*`` where split folders exist (train, val, test), else ``<class>/*`` as train."""
    present = [s for s in ("train", "val", "test") if (root / s).is_dir()]
    if present:
        return {s: _rebase(folder_split(root / s), s) for s in present}
    return {"train": folder_split(root)}


def read_fonts(
    font_dirs: list[Path] | None, size: int = 64, test_fraction: float = 0.5, seed: int = 0
) -> tuple[dict[str, SplitPlan], Callable[[SourceItem], tuple[bytes, str]], Path]:
    """62 glyphs of every font that renders (class = font), class-disjoint train / test, stored as PNG."""
    from .glyphs import GLYPHS, find_fonts, load_glyphs

    fonts = find_fonts(font_dirs)
    root = Path(os.path.commonpath([str(f.parent) for f in fonts]))
    glyphs = load_glyphs(font_dirs, size=size)  # cached; fonts that do not render are already dropped
    train, test = glyphs.split(test_fraction, seed=seed)
    splits = {}
    for split, part in (("train", train), ("test", test)):
        items = [
            SourceItem(f"{name}#{ch}", label, name) for label, name in enumerate(part.class_names) for ch in GLYPHS
        ]
        splits[split] = SplitPlan(list(part.class_names), items)
    position = {name: n for n, name in enumerate(glyphs.class_names)}

    def read(item: SourceItem) -> tuple[bytes, str]:
        from PIL import Image

        name, ch = item.source.rsplit("#", 1)
        image = glyphs.images[position[name] * len(GLYPHS) + GLYPHS.index(ch)]
        buf = io.BytesIO()
        Image.fromarray(image).convert("RGB").save(buf, format="PNG")
        return buf.getvalue(), "png"

    return {s: p for s, p in splits.items() if p.items}, read, root


def read_source(
    kind: str,
    root: Path | None,
    *,
    synsets: Path | None = None,
    fonts: list[Path] | None = None,
    font_size: int = 64,
    seed: int = 0,
) -> SourcePlan:
    """The plan for a source folder of layout ``kind`` (one of :data:`KINDS`)."""
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
        "imagenet": lambda: read_imagenet(root, synsets),
        "cub": lambda: read_cub(root),
        "cars": lambda: read_cars(root),
        "sop": lambda: read_sop(root),
        "folder": lambda: read_folder(root),
    }
    splits = readers[kind]()
    empty = [s for s, p in splits.items() if not p.items]
    if not splits or empty:
        raise SourceError(f"no images found for split(s) {empty or 'any'} under {root} (layout {kind!r})")
    return SourcePlan(kind, root, splits)
