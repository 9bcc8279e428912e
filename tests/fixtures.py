"""Small datasets in each real source layout, with real glyph images as the pictures."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from distpddm.data.glyphs import find_fonts, load_glyphs


def glyph_images(n_classes: int, per_class: int, cache_dir: Path) -> list[list[np.ndarray]]:
    """``n_classes`` fonts x ``per_class`` glyph images (uint8 grey, 32 px)."""
    g = load_glyphs(max_fonts=n_classes + 4, cache_dir=cache_dir)
    assert len(g.class_names) >= n_classes, "not enough fonts rendered"
    return [list(g.images[g.labels == c][:per_class]) for c in range(n_classes)]


def save(img: np.ndarray, path: Path, fmt: str = "JPEG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).convert("RGB").resize((48, 40)).save(path, format=fmt)


def make_folder(root: Path, images, names=None, ext=".jpg") -> dict[str, str]:
    """``root/<class>/<n>.jpg``; returns relative path -> class name."""
    truth = {}
    for c, imgs in enumerate(images):
        name = names[c] if names else f"class_{c:03d}"
        for n, img in enumerate(imgs):
            rel = f"{name}/{n:03d}{ext}"
            save(img, root / rel, "PNG" if ext == ".png" else "JPEG")
            truth[rel] = name
    return truth


def make_imagenet(root: Path, images) -> tuple[dict[str, str], Path]:
    wnids = [f"n{10000000 + 17 * c:08d}" for c in range(len(images))]
    truth = {f"train/{k}": v for k, v in make_folder(root / "train", images, wnids, ".JPEG").items()}
    synsets = root / "synsets.txt"
    synsets.write_text("".join(f"{w} some name\n" for w in reversed(wnids)))  # a class order not sorted
    return truth, synsets


def make_cub(root: Path, images, class_ids) -> dict[str, tuple[str, int]]:
    """CUB_200_2011 files; returns relative path -> (class name, class id)."""
    lines_img, lines_lab, truth, n = [], [], {}, 1
    for imgs, cid in zip(images, class_ids, strict=True):
        name = f"{cid:03d}.Bird_{cid}"
        for k, img in enumerate(imgs):
            rel = f"{name}/{name}_{k}.jpg"
            save(img, root / "images" / rel)
            lines_img.append(f"{n} {rel}")
            lines_lab.append(f"{n} {cid}")
            truth[f"images/{rel}"] = (name, cid)
            n += 1
    (root / "images.txt").write_text("\n".join(lines_img) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(lines_lab) + "\n")
    classes = [f"{c} {c:03d}.Bird_{c}" for c in range(1, 201)]
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return truth


def make_cars(root: Path, images, class_ids) -> dict[str, tuple[str, int]]:
    from scipy.io import savemat

    names = [f"Car Model {c}" for c in range(1, 197)]
    anns, truth = [], {}
    for imgs, cid in zip(images, class_ids, strict=True):
        for k, img in enumerate(imgs):
            rel = f"car_ims/{cid:03d}{k:03d}.jpg"
            save(img, root / rel)
            anns.append((rel, 0, 0, 40, 30, cid, 0))
            truth[rel] = (names[cid - 1], cid)
    dt = [
        ("relative_im_path", "O"),
        ("bbox_x1", "O"),
        ("bbox_y1", "O"),
        ("bbox_x2", "O"),
        ("bbox_y2", "O"),
        ("class", "O"),
        ("test", "O"),
    ]
    rec = np.array(anns, dtype=dt)
    class_names = np.empty((1, len(names)), dtype=object)
    for i, n in enumerate(names):
        class_names[0, i] = n
    savemat(root / "cars_annos.mat", {"annotations": rec.reshape(1, -1), "class_names": class_names})
    return truth


def make_sop(root: Path, train_images, test_images) -> dict[str, tuple[str, str]]:
    truth = {}
    for split, images, first in (("train", train_images, 1), ("test", test_images, 1 + len(train_images))):
        lines, n = ["image_id class_id super_class_id path"], 1
        for c, imgs in enumerate(images):
            cid = first + c
            for k, img in enumerate(imgs):
                rel = f"bicycle_final/{cid}_{k}.JPG"
                save(img, root / rel)
                lines.append(f"{n} {cid} 1 {rel}")
                truth[rel] = (f"product_{cid:05d}", split)
                n += 1
        (root / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    return truth


def copy_fonts(dst: Path, n: int) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for f in find_fonts()[:n]:
        shutil.copy(f, dst / f.name)
        out.append(dst / f.name)
    return out


def font_shards(root: Path, n_fonts: int) -> Path:
    """``root/shards``: glyph shards of ``n_fonts`` real fonts (class = font), built as users build them; the
    rendered glyphs cached in ``root/cache`` unless DISTPDDM_CACHE names another cache."""
    import os

    from distpddm.data.shards import BuildOptions, build
    from distpddm.data.sources import read_source

    copy_fonts(root / "fonts", n_fonts)
    os.environ.setdefault("DISTPDDM_CACHE", str(root / "cache"))
    plan = read_source("fonts", None, fonts=[root / "fonts"], font_size=32)
    build(plan, root / "shards", BuildOptions(shard_bytes=1_500_000, progress=False))
    return root / "shards"


def jpeg_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


def write_shards(split_dir: Path, samples: list[tuple[int, bytes]], per_shard: int, ext: str = "jpg") -> None:
    """A split laid out as the builder lays it out (tars, per-shard indexes, index.json) from ``(label, image
    bytes)`` pairs in the given order: for bytes the builder would refuse (corrupt images)."""
    import json

    import webdataset as wds

    from distpddm.data.tarindex import idx_name, index_tar, save_index

    split_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for first in range(0, len(samples), per_shard):
        name = f"shard-{first // per_shard:06d}.tar"
        with open(split_dir / name, "wb") as f:
            writer = wds.TarWriter(f, encoder=False)
            for n, (label, data) in enumerate(samples[first : first + per_shard], start=first):
                writer.write({"__key__": f"s{n:010d}", ext: data, "cls": str(label).encode()})
            writer.close()
        save_index(index_tar(split_dir / name)[0], split_dir / idx_name(name))
        shards.append({"name": name, "samples": len(samples[first : first + per_shard]), "first_index": first})
    n_classes = max(label for label, _ in samples) + 1
    counts = [sum(1 for label, _ in samples if label == c) for c in range(n_classes)]
    index = {"classes": [str(c) for c in range(n_classes)], "class_counts": counts, "samples": len(samples)}
    (split_dir / "index.json").write_text(json.dumps(index | {"shards": shards, "chunk_size": 4}))


class FaultyStore(BaseHTTPRequestHandler):
    """A folder over HTTP as fsspec reads it (HEAD; GET whole or with Range); ``answer(method, name, nth)``
    (``nth``: the how-manieth request for that file) may give another status instead (503, 404), or ``"cut"``:
    the headers and half the body, then the TCP connection closed (a server or proxy dropping it mid-body)."""

    root: Path
    answer = None
    requests: Counter

    def log_message(self, *args):
        pass

    def _file(self, body: bool) -> None:
        name = self.path.split("?", 1)[0].lstrip("/")
        self.requests[name] += 1
        status = type(self).answer(self.command, name, self.requests[name]) if type(self).answer else None
        path = (self.root / name).resolve()
        cut = status == "cut"
        status = None if cut else status
        if status is None and (not path.is_file() or self.root.resolve() not in path.parents):
            status = 404
        if status is not None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = path.read_bytes()
        lo, hi, status = 0, len(data), 200
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        if match:  # "lo-hi", or "lo-" to the end
            lo = int(match.group(1) or 0)
            hi = min(len(data), int(match.group(2)) + 1) if match.group(2) else len(data)
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(hi - lo))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {lo}-{hi - 1}/{len(data)}")
        self.end_headers()
        if body and cut:
            self.wfile.write(data[lo : lo + (hi - lo) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        elif body:
            self.wfile.write(data[lo:hi])

    def do_GET(self):  # noqa: N802
        self._file(True)

    def do_HEAD(self):  # noqa: N802
        self._file(False)


@contextlib.contextmanager
def http_store(root: Path):
    """``root`` served over HTTP on a free port: yields the handler class (``base``: the URL of ``root``; set
    ``answer`` to make requests fail; ``requests`` counts them by file)."""
    handler = type("Store", (FaultyStore,), {"root": root, "answer": None, "requests": Counter()})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    handler.base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


def wait_for_port(port: int, timeout: float) -> bool:
    """Whether a server started by a test accepts connections on 127.0.0.1:``port`` within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False
