"""Build and verify WebDataset shards laid out for class-balanced streaming.

Layout (see ``shards/README.md``): each split's samples are cut into class-contiguous *chunks* of
``chunk_size`` images of one class; chunk order is shuffled once at build time (seeded), and shards are
consecutive runs of chunks. A reader that keeps a small buffer of chunks can then form P classes x K images
batches from a stream without ever holding the dataset, whatever the number of classes.

Building is resumable: every shard is planned up front (which samples, in which order), written to a
temporary name and renamed when complete, with a sidecar ``.json`` (count, bytes, sha256, class counts).
A rerun skips shards whose sidecar matches the plan; ``index.json`` is written last.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .sources import SourceItem, SourcePlan, SplitPlan

INDEX = "index.json"
INDEX_VERSION = 1
DEFAULT_SHARD_BYTES = 512 * 2**20


@dataclass(frozen=True)
class BuildOptions:
    shard_bytes: int = DEFAULT_SHARD_BYTES
    max_side: int | None = None  # re-encode as JPEG with the longer side at most this (None: keep bytes)
    jpeg_quality: int = 90
    chunk_size: int = 4  # images of one class stored together; build with the largest K you will train with
    seed: int = 0
    workers: int | None = None
    progress: bool = True

    def __post_init__(self):
        if self.shard_bytes < 1:
            raise ValueError(f"shard size must be positive, got {self.shard_bytes}")
        if self.max_side is not None and self.max_side < 8:
            raise ValueError(f"--max-side must be at least 8 pixels, got {self.max_side}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk size must be >= 1, got {self.chunk_size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {self.jpeg_quality}")


# ----------------------------------------------------------------------------------------------- planning


def plan_order(split: SplitPlan, chunk_size: int, seed: int) -> list[int]:
    """Sample order: per class shuffled and cut into chunks of ``chunk_size``; chunk order shuffled."""
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for n, item in enumerate(split.items):
        by_class.setdefault(item.label, []).append(n)
    chunks = []
    for label in sorted(by_class):
        members = by_class[label]
        rng.shuffle(members)
        chunks += [members[s : s + chunk_size] for s in range(0, len(members), chunk_size)]
    rng.shuffle(chunks)
    return [n for chunk in chunks for n in chunk]


def _estimated_bytes(plan: SourcePlan, item: SourceItem, max_side: int | None) -> int:
    if plan.reader is not None:
        return 4096 if max_side is None else min(4096, max_side * max_side // 4)
    size = os.path.getsize(plan.root / item.source)
    # A re-encoded JPEG at quality 90 costs about 0.25 bytes per pixel of its 3:4 frame.
    return size if max_side is None else min(size, int(max_side * max_side * 0.75 * 0.25) + 1024)


def plan_shards(plan: SourcePlan, split: str, options: BuildOptions) -> list[list[int]]:
    """Consecutive runs of the sample order, cut where the estimated bytes reach the shard size."""
    sp = plan.splits[split]
    order = plan_order(sp, options.chunk_size, options.seed)
    shards, current, size = [], [], 0
    for n in order:
        est = _estimated_bytes(plan, sp.items[n], options.max_side)
        if current and size + est > options.shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(n)
        size += est
    if current:
        shards.append(current)
    return shards


# ------------------------------------------------------------------------------------------------ writing


def encode_image(data: bytes, ext: str, max_side: int | None, quality: int) -> tuple[bytes, str, int, int]:
    """Image bytes as stored (as they are, or a JPEG whose longer side is at most ``max_side``) + the size as
    displayed. Re-encoding applies the EXIF orientation (the new JPEG carries none) and decodes large JPEGs
    at reduced scale first; kept bytes keep their EXIF, which the readers apply."""
    from PIL import Image, ImageOps

    from .images import upright_size

    with Image.open(io.BytesIO(data)) as opened:
        width, height = upright_size(opened)
        scale = 1.0 if max_side is None else min(1.0, max_side / max(width, height))
        if scale < 1 and opened.format == "JPEG":  # DCT scaling to no less than the target size
            opened.draft("RGB", (max(1, int(opened.width * scale)), max(1, int(opened.height * scale))))
        opened.load()  # decode fully now: a truncated file fails the build, not a training run
        if max_side is None:
            return data, ext, width, height
        img = ImageOps.exif_transpose(opened).convert("RGB")
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        if img.size != size:
            img = img.resize(size, Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), "jpg", size[0], size[1]


def shard_name(n: int) -> str:
    return f"shard-{n:06d}.tar"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class _HashingReader:
    """A read-only file wrapper that hashes everything read through it (tarfile's stream mode reads it)."""

    def __init__(self, raw):
        self.raw, self.digest = raw, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> None:
        """Hash what the reader left unread (tar padding, or everything after a parse error)."""
        while self.read(1 << 20):
            pass

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def _plan_digest(plan: SourcePlan, split: str, members: Sequence[int], options: BuildOptions) -> str:
    items = plan.splits[split].items
    h = hashlib.sha256(json.dumps([options.max_side, options.jpeg_quality]).encode())
    for n in members:
        h.update(f"{items[n].source}\t{items[n].label}\n".encode())
    return h.hexdigest()[:16]


def write_shard(
    plan: SourcePlan,
    split: str,
    shard: int,
    members: Sequence[int],
    out_dir: Path,
    options: BuildOptions,
    first_index: int,
) -> dict:
    """Write one shard (atomically) and its sidecar; returns the sidecar's record."""
    import webdataset as wds

    items = plan.splits[split].items
    final = out_dir / shard_name(shard)
    tmp = final.with_suffix(".tar.tmp")
    counts: dict[int, int] = {}
    try:
        with open(tmp, "wb") as f:
            # Fixed owner and mtime: the same inputs and seed give byte-identical shards. An integer mtime: a
            # float one costs every member an extra PAX header block, which readers parse in Python.
            writer = wds.TarWriter(f, user="distpddm", group="distpddm", mtime=0, encoder=False)
            try:
                for offset, n in enumerate(members):
                    item = items[n]
                    raw, ext = plan.read(item)
                    data, ext, width, height = encode_image(raw, ext, options.max_side, options.jpeg_quality)
                    meta = {"source": item.source, "class_name": item.class_name, "width": width, "height": height}
                    writer.write(
                        {
                            "__key__": f"s{first_index + offset:010d}",
                            ext: data,
                            "cls": str(item.label).encode(),
                            "json": json.dumps(meta, sort_keys=True).encode(),
                        }
                    )
                    counts[item.label] = counts.get(item.label, 0) + 1
            finally:
                writer.close()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)
    record = {
        "name": final.name,
        "samples": len(members),
        "first_index": first_index,
        "bytes": final.stat().st_size,
        "sha256": _sha256(final),
        "class_counts": {str(k): v for k, v in sorted(counts.items())},
        "plan": _plan_digest(plan, split, members, options),
    }
    sidecar = final.with_suffix(".json")
    sidecar.with_suffix(".json.tmp").write_text(json.dumps(record))
    os.replace(sidecar.with_suffix(".json.tmp"), sidecar)
    return record


def _finished(out_dir: Path, shard: int, digest: str) -> dict | None:
    sidecar = out_dir / shard_name(shard).replace(".tar", ".json")
    tar = out_dir / shard_name(shard)
    if not (sidecar.exists() and tar.exists()):
        return None
    try:
        record = json.loads(sidecar.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("plan") != digest or record.get("bytes") != tar.stat().st_size:
        return None
    return record


def build_split(plan: SourcePlan, split: str, out: Path, options: BuildOptions) -> dict:
    """Build (or finish building) one split's shards and write its index; returns the index."""
    out_dir = Path(out) / split
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(plan, split, options)
    starts = [0]
    for members in shards[:-1]:
        starts.append(starts[-1] + len(members))
    records: dict[int, dict] = {}
    todo = []
    for n, members in enumerate(shards):
        done = _finished(out_dir, n, _plan_digest(plan, split, members, options))
        if done is not None:
            records[n] = done
        else:
            todo.append(n)
    total = sum(len(m) for m in shards)
    bar = tqdm(total=total, disable=not options.progress, unit="img", desc=f"build {split}")
    bar.update(sum(r["samples"] for r in records.values()))
    workers = options.workers or min(len(todo), os.cpu_count() or 1) or 1
    if todo and workers > 1 and plan.reader is None:
        with ProcessPoolExecutor(workers) as pool:
            futures = {
                pool.submit(write_shard, plan, split, n, shards[n], out_dir, options, starts[n]): n for n in todo
            }
            for fut in as_completed(futures):
                records[futures[fut]] = fut.result()
                bar.update(len(shards[futures[fut]]))
    else:  # in-process sources (rendered fonts) hold a reader that is cheaper to run here than to ship
        for n in todo:
            records[n] = write_shard(plan, split, n, shards[n], out_dir, options, starts[n])
            bar.update(len(shards[n]))
    bar.close()
    for stale in out_dir.glob("shard-*.tar"):  # shards of an older, larger plan
        if int(stale.stem.split("-")[1]) >= len(shards):
            stale.unlink()
            stale.with_suffix(".json").unlink(missing_ok=True)
    sp = plan.splits[split]
    class_counts = [0] * len(sp.classes)
    for item in sp.items:
        class_counts[item.label] += 1
    index = {
        "version": INDEX_VERSION,
        "split": split,
        "source_kind": plan.kind,
        "samples": total,
        "classes": sp.classes,
        "class_counts": class_counts,
        "chunk_size": options.chunk_size,
        "seed": options.seed,
        "max_side": options.max_side,
        "shards": [
            {k: records[n][k] for k in ("name", "samples", "first_index", "bytes", "sha256")}
            for n in range(len(shards))
        ],
        "options": asdict(options) | {"progress": None, "workers": None},
    }
    tmp = out_dir / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out_dir / INDEX)
    return index


def build(plan: SourcePlan, out: Path, options: BuildOptions) -> dict[str, dict]:
    return {split: build_split(plan, split, Path(out), options) for split in plan.splits}


# ----------------------------------------------------------------------------------------------- verifying


@dataclass
class VerifyReport:
    split_dir: str
    shards: int = 0
    samples: int = 0
    decoded: int = 0
    problems: list[str] | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


def load_index(split_dir: Path) -> dict:
    path = Path(split_dir) / INDEX
    if not path.exists():
        raise FileNotFoundError(f"no {INDEX} in {split_dir}: build the shards first (distpddm shards build)")
    return json.loads(path.read_text())


def verify_split(split_dir: Path, sample: float = 1.0, seed: int = 0, progress: bool = True) -> VerifyReport:
    """Hashes, counts, labels in range and (a ``sample`` fraction of) images decoding, against the index."""
    import tarfile

    from PIL import Image

    split_dir = Path(split_dir)
    index = load_index(split_dir)
    report = VerifyReport(str(split_dir), problems=[])
    problems = report.problems
    n_classes = len(index["classes"])
    rng = random.Random(seed)
    counts = [0] * n_classes
    bar = tqdm(total=index["samples"], disable=not progress, unit="img", desc=f"verify {split_dir.name}")
    for shard in index["shards"]:
        path = split_dir / shard["name"]
        report.shards += 1
        if not path.exists():
            problems.append(f"{shard['name']}: missing")
            continue
        samples: dict[str, dict[str, bytes]] = {}
        unreadable = None
        with open(path, "rb") as raw:
            hashed = _HashingReader(raw)  # one read of the shard serves both the hash and the samples
            try:
                with tarfile.open(fileobj=hashed, mode="r|") as tar:
                    for member in tar:
                        key, _, field = member.name.partition(".")
                        samples.setdefault(key, {})[field] = tar.extractfile(member).read()
            except (tarfile.TarError, OSError, EOFError) as e:
                unreadable = e
            hashed.drain()
        if hashed.hexdigest() != shard["sha256"]:
            problems.append(f"{shard['name']}: sha256 does not match the index (corrupt or replaced)")
        if unreadable is not None:
            problems.append(f"{shard['name']}: unreadable tar ({unreadable})")
            continue
        if len(samples) != shard["samples"]:
            problems.append(f"{shard['name']}: {len(samples)} samples, index says {shard['samples']}")
        for key, fields in samples.items():
            report.samples += 1
            bar.update(1)
            where = f"{shard['name']}:{key}"
            try:
                label = int(fields["cls"])
            except (KeyError, ValueError):
                problems.append(f"{where}: missing or bad cls")
                continue
            if not 0 <= label < n_classes:
                problems.append(f"{where}: label {label} outside 0..{n_classes - 1}")
                continue
            counts[label] += 1
            images = [f for f in fields if f in ("jpg", "jpeg", "png", "webp", "bmp")]
            if not images:
                problems.append(f"{where}: no image")
                continue
            if "json" not in fields:
                problems.append(f"{where}: no json metadata")
            if sample >= 1.0 or rng.random() < sample:
                try:
                    with Image.open(io.BytesIO(fields[images[0]])) as img:
                        img.load()
                    report.decoded += 1
                except Exception as e:  # noqa: BLE001 -- any decoder failure is a finding
                    problems.append(f"{where}: image does not decode ({type(e).__name__}: {e})")
    bar.close()
    if report.samples != index["samples"]:
        problems.append(f"{report.samples} samples in shards, index says {index['samples']}")
    if counts != index["class_counts"] and not any("unreadable" in p or "missing" in p for p in problems):
        diff = [n for n, (a, b) in enumerate(zip(counts, index["class_counts"], strict=True)) if a != b]
        problems.append(f"per-class counts differ from the index for {len(diff)} classes (first: {diff[:5]})")
    return report


def verify(out: Path, sample: float = 1.0, progress: bool = True) -> list[VerifyReport]:
    """Verify every split under ``out`` (folders holding an index.json), or ``out`` itself if it is one."""
    out = Path(out)
    dirs = [out] if (out / INDEX).exists() else sorted(p.parent for p in out.glob(f"*/{INDEX}"))
    if not dirs:
        raise FileNotFoundError(f"no {INDEX} under {out}: nothing to verify")
    return [verify_split(d, sample, progress=progress) for d in dirs]
