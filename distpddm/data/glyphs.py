"""Real images without a download: the 62 glyphs A-Z a-z 0-9 of every font file found, class = font.

Debian's ``fonts-aenigma`` ships 465 real display fonts, which makes a fine-grained, class-disjoint
retrieval task (which font is this letter in?) for tests and the CPU demo.
"""

from __future__ import annotations

import hashlib
import os
import string
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GLYPHS = string.ascii_uppercase + string.ascii_lowercase + string.digits
FONT_SUFFIXES = (".ttf", ".otf", ".TTF", ".OTF")
#: Searched in this order when no folder is named; the first is Debian's fonts-aenigma.
DEFAULT_FONT_DIRS = ("/usr/share/fonts/truetype/aenigma", "/usr/share/fonts")


class FontsNotFound(RuntimeError):
    pass


def find_fonts(dirs: Iterable[str | os.PathLike] | None = None) -> list[Path]:
    """Every font file under ``dirs`` (recursively), sorted; the first default folder that has any."""
    if dirs is None:
        for d in DEFAULT_FONT_DIRS:
            found = find_fonts([d]) if Path(d).is_dir() else []
            if found:
                return found
        raise FontsNotFound(
            f"no font files under {', '.join(DEFAULT_FONT_DIRS)}; install Debian's fonts-aenigma "
            "(apt-get install fonts-aenigma) or name a folder of .ttf/.otf files"
        )
    files = {p for d in dirs for p in Path(d).rglob("*") if p.suffix in FONT_SUFFIXES and p.is_file()}
    return sorted(files)


def render_font(path: str | os.PathLike, size: int = 32) -> np.ndarray | None:
    """The 62 glyphs of one font as ``(62, size, size)`` uint8 (white on black), centred by their ink box.

    ``None`` for a font that cannot be read or whose glyphs are mostly blank or all alike (symbol fonts).
    """
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.truetype(str(path), size=int(size * 0.8))
    except OSError:
        return None
    out = np.zeros((len(GLYPHS), size, size), dtype=np.uint8)
    for n, ch in enumerate(GLYPHS):
        try:
            left, top, right, bottom = font.getbbox(ch)
        except (OSError, ValueError):
            return None
        w, h = max(1, right - left), max(1, bottom - top)
        canvas = Image.new("L", (max(size, w), max(size, h)), 0)
        ImageDraw.Draw(canvas).text(((canvas.width - w) / 2 - left, (canvas.height - h) / 2 - top), ch, 255, font)
        if canvas.size != (size, size):
            canvas = canvas.resize((size, size), Image.BILINEAR)
        out[n] = np.asarray(canvas)
    blank = (out.reshape(len(GLYPHS), -1).max(1) < 32).mean()
    distinct = len({g.tobytes() for g in out})
    if blank > 0.1 or distinct < len(GLYPHS) // 2:
        return None
    return out


@dataclass(frozen=True)
class GlyphSet:
    images: np.ndarray  # (N, size, size) uint8
    labels: np.ndarray  # (N,) int64, index into class_names
    class_names: list[str]  # font file stems

    def __len__(self) -> int:
        return len(self.labels)

    def save(self, path: str | os.PathLike) -> None:
        """One compressed ``.npz`` (the render cache's format, read back by :meth:`load`)."""
        np.savez_compressed(path, images=self.images, labels=self.labels, class_names=np.array(self.class_names))

    @staticmethod
    def load(path: str | os.PathLike) -> GlyphSet:
        with np.load(path, allow_pickle=False) as z:
            return GlyphSet(z["images"], z["labels"], [str(n) for n in z["class_names"]])

    def classes(self, keep: Sequence[int]) -> GlyphSet:
        """The samples of the classes ``keep``, relabelled 0..len(keep)-1 in that order."""
        keep = list(keep)
        remap = np.full(len(self.class_names), -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        mask = remap[self.labels] >= 0
        return GlyphSet(self.images[mask], remap[self.labels[mask]], [self.class_names[k] for k in keep])

    def split(self, test_fraction: float = 0.5, seed: int = 0) -> tuple[GlyphSet, GlyphSet]:
        """Class-disjoint train / test split (fonts shuffled with ``seed``)."""
        order = np.random.default_rng(seed).permutation(len(self.class_names))
        n_test = int(round(len(order) * test_fraction))
        return self.classes(sorted(order[n_test:])), self.classes(sorted(order[:n_test]))


def _cache_path(fonts: Sequence[Path], size: int, cache_dir: Path) -> Path:
    digest = hashlib.sha256()
    for f in fonts:
        st = f.stat()
        digest.update(f"{f}:{st.st_size}:{int(st.st_mtime)}\n".encode())
    return cache_dir / f"glyphs-{size}px-{digest.hexdigest()[:16]}.npz"


def default_cache_dir() -> Path:
    return Path(os.environ.get("DISTPDDM_CACHE", Path.home() / ".cache" / "distpddm"))


def load_glyphs(
    font_dirs: Iterable[str | os.PathLike] | None = None,
    size: int = 32,
    max_fonts: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    workers: int | None = None,
) -> GlyphSet:
    """Render (or read from cache) the glyph set of the fonts found; fonts that do not render are dropped."""
    fonts = find_fonts(font_dirs)
    if max_fonts is not None:
        fonts = fonts[:max_fonts]
    if not fonts:
        raise FontsNotFound(f"no font files under {list(font_dirs or [])}")
    cache = _cache_path(fonts, size, Path(cache_dir) if cache_dir else default_cache_dir())
    if cache.exists():
        return GlyphSet.load(cache)
    workers = workers or min(4, os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) as pool:
        rendered = list(pool.map(render_font, fonts, [size] * len(fonts), chunksize=8))
    kept = [(f.stem, r) for f, r in zip(fonts, rendered, strict=True) if r is not None]
    if not kept:
        raise FontsNotFound(f"none of the {len(fonts)} font files rendered usable glyphs")
    images = np.concatenate([r for _, r in kept])
    labels = np.repeat(np.arange(len(kept), dtype=np.int64), len(GLYPHS))
    glyphs = GlyphSet(images, labels, [n for n, _ in kept])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
    glyphs.save(tmp)
    os.replace(tmp, cache)
    return glyphs
