"""Build and verify WebDataset shards laid out for class-balanced streaming.

Layout (see ``shards/README.md``): each split's samples are cut into class-contiguous *chunks* of
``chunk_size`` images of one class; chunk order is shuffled once at build time (seeded), and shards are
consecutive runs of chunks. A reader that keeps a small buffer of chunks can then form P classes x K images
batches from a stream without ever holding the dataset, whatever the number of classes. Beside every shard
an index of its samples' byte offsets and labels (:mod:`.tarindex`) lets readers start anywhere in it.

Building is resumable: every shard is planned up front (which samples, in which order), written to a
temporary name and renamed when complete, with its index and a sidecar ``.json`` (count, bytes, sha256,
class counts, files left out). A rerun skips shards whose sidecar matches the plan; ``index.json`` is
written last. Worker processes receive only their shard's samples, never the whole plan.

Every file is fsynced before it is renamed into place, and its folder after (:mod:`distpddm.durable`): after a
power loss, an ``index.json`` names only complete shards. Before a build changes a split's shards it puts an
``index.incomplete`` marker in place of the split's ``index.json``, and takes it away only once the new
``index.json`` is written: an interrupted build (or rebuild with other options) leaves no index describing a
mix of two builds, and readers and ``shards verify`` refuse the split, saying why.

A source file that does not read or decode stops the build with an error naming it; with ``skip_bad`` it
is left out, listed in the sidecar, ``index.json`` and the summary, and the build stops only past
``max_bad`` such files.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..durable import atomic_write_text, fsync_dir, fsync_file
from ..errors import DeterministicError
from .images import IMAGE_EXTENSIONS
from .retry import describe_error
from .sources import SourcePlan, SplitPlan
from .tarindex import SampleWriter, idx_name, index_tar, load_shard_index, save_index

INDEX = "index.json"
INCOMPLETE = "index.incomplete"  # in place of index.json while a build of the split is under way
INDEX_VERSION = 2
#: ``layout`` of a split's index.json that `distpddm shards index` wrote for published shards it indexed in place.
FOREIGN_LAYOUT = "foreign"
DEFAULT_SHARD_BYTES = 512 * 2**20


class BadSourceError(ValueError):
    """A source image does not read or decode (or too many do, with ``skip_bad``)."""


class IncompleteBuildError(FileNotFoundError):
    """A split whose build was interrupted: it has no ``index.json``, and its shards may come from two builds."""


def incomplete_message(split_dir: str | Path) -> str:
    return (
        f"{split_dir}: the build of this split was interrupted and never finished, so it has no {INDEX} (its "
        "shards may be a mix of two builds); rerun `distpddm shards build` to finish it"
    )


@dataclass(frozen=True)
class BuildOptions:
    shard_bytes: int = DEFAULT_SHARD_BYTES
    max_side: int | None = None  # re-encode as JPEG with the longer side at most this (None: keep bytes)
    jpeg_quality: int = 90
    chunk_size: int = 8  # images of one class stored together: 2 K (docs/benchmarks.md, "Positive pairs")
    seed: int = 0
    workers: int | None = None
    progress: bool = True
    skip_bad: bool = False  # leave out source files that do not decode (listed) instead of stopping
    max_bad: float = 0.001  # with skip_bad: stop past this many bad files (a count, or a fraction if < 1)

    def __post_init__(self):
        if self.shard_bytes < 1:
            raise ValueError(f"shard size must be positive, got {self.shard_bytes}")
        if self.max_side is not None and self.max_side < 8:
            raise ValueError(f"--max-side must be at least 8 pixels, got {self.max_side}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk size must be >= 1, got {self.chunk_size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"JPEG quality must be in 1..100, got {self.jpeg_quality}")
        if self.max_bad < 0:
            raise ValueError(f"--max-bad must be >= 0, got {self.max_bad}")

    def bad_allowed(self, total: int) -> int:
        return int(self.max_bad) if self.max_bad >= 1 else math.ceil(self.max_bad * total)


# ----------------------------------------------------------------------------------------------- planning


def plan_order(split: SplitPlan, chunk_size: int, seed: int) -> np.ndarray:
    """Sample order: per class shuffled and cut into chunks of ``chunk_size``; chunk order shuffled."""
    rng = np.random.default_rng(seed)
    n = len(split)
    by_class = np.lexsort((rng.random(n), split.labels))  # each class's samples together, shuffled
    labels = split.labels[by_class]
    class_start = np.searchsorted(labels, labels, side="left")
    chunk = (np.arange(n) - class_start) // chunk_size  # chunk number within the class
    new_chunk = np.ones(n, dtype=bool)
    new_chunk[1:] = (labels[1:] != labels[:-1]) | (chunk[1:] != chunk[:-1])
    chunk_id = np.cumsum(new_chunk) - 1
    chunk_rank = rng.permutation(int(chunk_id[-1]) + 1 if n else 0)  # a shuffled order of the chunks
    return by_class[np.argsort(chunk_rank[chunk_id], kind="stable")]


#: Tar bytes around each image: three 512-byte headers, the cls and json members' blocks, the image's padding.
SAMPLE_OVERHEAD = 5 * 512 + 256


def estimated_bytes(plan: SourcePlan, split: SplitPlan, max_side: int | None) -> np.ndarray:
    """Bytes each sample will take in a shard (to cut shards at about the target size)."""
    if split.sizes is None:  # rendered (fonts): no file to size
        image = np.full(len(split), 4096 if max_side is None else min(4096, max_side * max_side // 4), np.int64)
    elif max_side is None:
        image = split.sizes
    else:  # a re-encoded JPEG at quality 90 costs about 0.25 bytes per pixel of its 3:4 frame
        image = np.minimum(split.sizes, int(max_side * max_side * 0.75 * 0.25) + 1024)
    return image + SAMPLE_OVERHEAD


def plan_shards(plan: SourcePlan, split: str, options: BuildOptions) -> list[np.ndarray]:
    """Consecutive runs of the sample order, cut where the estimated bytes reach the shard size."""
    sp = plan.splits[split]
    order = plan_order(sp, options.chunk_size, options.seed)
    ends = np.cumsum(estimated_bytes(plan, sp, options.max_side)[order])
    shards, start, base = [], 0, 0
    while start < len(order):
        stop = max(int(np.searchsorted(ends, base + options.shard_bytes, side="right")), start + 1)
        shards.append(order[start:stop])
        base, start = int(ends[stop - 1]), stop
    return shards


def plan_summary(plan: SourcePlan, options: BuildOptions) -> dict[str, dict]:
    """What a build would write, per split, without writing it (``shards build --dry-run``)."""
    out = {}
    for name, split in plan.splits.items():
        shards = plan_shards(plan, name, options)
        estimate = estimated_bytes(plan, split, options.max_side)
        out[name] = {
            "images": len(split),
            "classes": len(split.classes),
            "shards": len(shards),
            "estimated_bytes": int(estimate.sum()),
        }
    return out


# ------------------------------------------------------------------------------------------------ writing


def encode_image(data: bytes, ext: str, max_side: int | None, quality: int) -> tuple[bytes, str, int, int]:
    """Image bytes as stored (as they are, or a JPEG whose longer side is at most ``max_side``) + the size as
    displayed. Re-encoding applies the EXIF orientation (the new JPEG carries none) and decodes large JPEGs
    at reduced scale first; kept bytes keep their EXIF, which the readers apply."""
    from PIL import Image, ImageOps

    from .images import to_rgb, upright_size

    with Image.open(io.BytesIO(data)) as opened:
        width, height = upright_size(opened)
        scale = 1.0 if max_side is None else min(1.0, max_side / max(width, height))
        if scale < 1 and opened.format == "JPEG":  # DCT scaling to no less than the target size
            opened.draft("RGB", (max(1, int(opened.width * scale)), max(1, int(opened.height * scale))))
        opened.load()  # decode fully now: a truncated file fails the build, not a training run
        if max_side is None:
            return data, ext, width, height
        img = to_rgb(ImageOps.exif_transpose(opened))
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


@dataclass
class ShardTask:
    """Everything one shard's writer needs, and nothing more: what crosses to a worker process."""

    shard: int
    first_index: int
    sources: list[str]
    labels: np.ndarray  # int32
    class_names: dict[int, str]  # the names of the labels in this shard
    root: Path
    out_dir: Path
    options: BuildOptions

    def digest(self) -> str:
        h = hashlib.sha256(json.dumps([self.options.max_side, self.options.jpeg_quality]).encode())
        for source, label in zip(self.sources, self.labels.tolist(), strict=True):
            h.update(f"{source}\t{label}\n".encode(errors="surrogateescape"))
        return h.hexdigest()[:16]


def shard_tasks(plan: SourcePlan, split: str, out_dir: Path, options: BuildOptions) -> Iterator[ShardTask]:
    sp = plan.splits[split]
    first = 0
    for n, members in enumerate(plan_shards(plan, split, options)):
        labels = sp.labels[members]
        names = {label: sp.classes[label] for label in np.unique(labels).tolist()}
        yield ShardTask(n, first, [sp.sources[i] for i in members], labels, names, plan.root, out_dir, options)
        first += len(members)


def _read_file(root: Path, source: str) -> tuple[bytes, str]:
    path = root / source
    return path.read_bytes(), path.suffix.lower().lstrip(".")


def write_shard(task: ShardTask, reader: Callable[[str], tuple[bytes, str]] | None = None) -> dict:
    """Write one shard (atomically), its index and its sidecar; returns the sidecar's record."""
    if hasattr(reader, "prefetch"):  # a reader that fetches ahead, several reads in flight, in the shard's order
        with reader.prefetch(task.sources) as ahead:
            return write_shard(task, ahead)
    final = task.out_dir / shard_name(task.shard)
    tmp = final.with_suffix(".tar.tmp")
    counts: dict[int, int] = {}
    bad: list[dict] = []
    options = task.options
    try:
        writer = SampleWriter(tmp)
        try:
            for offset, (source, label) in enumerate(zip(task.sources, task.labels.tolist(), strict=True)):
                try:
                    raw, ext = reader(source) if reader is not None else _read_file(task.root, source)
                    data, ext, width, height = encode_image(raw, ext, options.max_side, options.jpeg_quality)
                except Exception as e:  # noqa: BLE001 -- whatever PIL or the file system raises
                    if isinstance(e, DeterministicError):  # the store's fault (no range requests), not this image's
                        raise
                    why = describe_error(e)  # redacted: it is kept in the sidecar and index.json
                    if not options.skip_bad:
                        raise BadSourceError(
                            f"{task.root / source}: cannot read or decode it ({why}). Remove or replace the "
                            "file, or rerun with --skip-bad to leave such files out (they are listed in "
                            "index.json); finished shards are kept and not rebuilt."
                        ) from None
                    bad.append({"source": source, "error": why})
                    continue
                meta = {"source": source, "class_name": task.class_names[label], "width": width, "height": height}
                key = f"s{task.first_index + offset:010d}"
                writer.write(key, label, {ext: data, "json": json.dumps(meta, sort_keys=True).encode()})
                counts[label] = counts.get(label, 0) + 1
        finally:
            index = writer.close()
        save_index(index, task.out_dir / idx_name(final.name))  # durably
        fsync_file(tmp)  # the shard's bytes on disk before its name says it is complete
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)
    fsync_dir(task.out_dir)
    record = {
        "name": final.name,
        "samples": len(task.sources) - len(bad),
        "first_index": task.first_index,
        "bytes": final.stat().st_size,
        "sha256": _sha256(final),
        "class_counts": {str(k): v for k, v in sorted(counts.items())},
        "bad": bad,
        "plan": task.digest(),
        "index_sha256": _sha256(task.out_dir / idx_name(final.name)),  # a rerun rewrites an index that differs
    }
    _write_sidecar(final.with_suffix(".json"), record)
    return record


def _finished(task: ShardTask) -> dict | None:
    """The sidecar of a shard already built from this plan (its index rewritten from the tar if missing or
    changed since it was written)."""
    tar = task.out_dir / shard_name(task.shard)
    sidecar = tar.with_suffix(".json")
    if not (sidecar.exists() and tar.exists()):
        return None
    try:
        record = json.loads(sidecar.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("plan") != task.digest() or record.get("bytes") != tar.stat().st_size or "bad" not in record:
        return None
    idx = task.out_dir / idx_name(tar.name)
    if not idx.exists() or record.get("index_sha256") != _sha256(idx):
        save_index(index_tar(tar)[0], idx)
        record["index_sha256"] = _sha256(idx)
        _write_sidecar(sidecar, record)
    return record


def _write_sidecar(path: Path, record: dict) -> None:
    atomic_write_text(path, json.dumps(record))


def _run_tasks(plan: SourcePlan, tasks: list[ShardTask], options: BuildOptions) -> Iterator[dict]:
    """Sidecar records as shards finish: in worker processes (at most two tasks queued per worker, so the
    parent never holds every shard's pickled task), or here for in-process sources (rendered fonts).
    Workers are forked (where the platform can), after ``gc.freeze()``: they share the parent's pages, and
    the collector does not walk -- and so copy -- the listing of millions of files in every worker. (A fork
    server would start leaner, but it re-imports the caller's main script: ``build()`` called from a script
    without a ``__main__`` guard would crash.)"""
    import gc
    import multiprocessing

    workers = options.workers or min(len(tasks), os.cpu_count() or 1) or 1
    in_workers = getattr(plan.reader, "in_workers", False)  # a picklable reader: run it in the worker processes
    if workers <= 1 or (plan.reader is not None and not in_workers):
        for task in tasks:
            yield write_shard(task, plan.reader)
        return
    fork = "fork" in multiprocessing.get_all_start_methods() and sys.platform == "linux"
    context = multiprocessing.get_context("fork" if fork else None)
    gc.freeze()
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        todo = iter(tasks)
        running = set()
        try:
            while True:
                for task in todo:
                    running.add(pool.submit(write_shard, task, plan.reader))
                    if len(running) >= 2 * workers:
                        break
                if not running:
                    return
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    yield fut.result()
        finally:
            for fut in running:
                fut.cancel()
            gc.unfreeze()


def build_split(plan: SourcePlan, split: str, out: Path, options: BuildOptions) -> dict:
    """Build (or finish building) one split's shards and write its index; returns the index."""
    out_dir = Path(out) / split
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(".*.tmp"):  # an atomic write's temporary file, left by a crash
        leftover.unlink(missing_ok=True)
    tasks = list(shard_tasks(plan, split, out_dir, options))
    records: dict[int, dict] = {}
    todo = []
    for task in tasks:
        done = _finished(task)
        if done is not None:
            records[task.shard] = done
        else:
            todo.append(task)
    stale = [p for p in out_dir.glob("shard-*.tar") if int(p.stem.split("-")[1]) >= len(tasks)]
    if todo or stale:
        _begin_changes(out_dir)
    total = sum(len(t.sources) for t in tasks)
    allowed = options.bad_allowed(total)
    bar = tqdm(total=total, disable=not options.progress, unit="img", desc=f"build {split}")
    bar.update(sum(len(t.sources) for t in tasks if t.shard in records))
    bad = [b for r in records.values() for b in r["bad"]]
    for record in _run_tasks(plan, todo, options):
        records[int(record["name"][6:12])] = record
        bad += record["bad"]
        bar.update(record["samples"] + len(record["bad"]))
        if len(bad) > allowed:
            bar.close()
            raise BadSourceError(
                f"{len(bad)} source files of split {split!r} do not read or decode, more than --max-bad allows "
                f"({allowed} of {total}); first: "
                + "; ".join(f"{b['source']} ({b['error']})" for b in bad[:5])
                + ". Finished shards are kept: fix the files or raise --max-bad, and rerun."
            )
    bar.close()
    for old in stale:  # shards of an older, larger plan
        for path in (old, old.with_suffix(".json"), out_dir / idx_name(old.name)):
            path.unlink(missing_ok=True)
    class_counts = [0] * len(plan.splits[split].classes)
    for record in records.values():
        for label, count in record["class_counts"].items():
            class_counts[int(label)] += count
    bad.sort(key=lambda b: b["source"])
    index = {
        "version": INDEX_VERSION,
        "split": split,
        "source_kind": plan.kind,
        "samples": sum(r["samples"] for r in records.values()),
        "classes": plan.splits[split].classes,
        "class_counts": class_counts,
        "chunk_size": options.chunk_size,
        "seed": options.seed,
        "max_side": options.max_side,
        "carving": plan.carving,
        "bad_files": bad,
        "shards": [
            {k: records[n][k] for k in ("name", "samples", "first_index", "bytes", "sha256")} for n in range(len(tasks))
        ],
        "options": asdict(options) | {"progress": None, "workers": None},
    }
    atomic_write_text(out_dir / INDEX, json.dumps(index, indent=1))  # last, durably, after every shard
    if (out_dir / INCOMPLETE).exists():
        (out_dir / INCOMPLETE).unlink()
        fsync_dir(out_dir)
    return index


def _begin_changes(out_dir: Path) -> None:
    """Before the first shard of a split is written (or removed): the marker in, the split's old index.json
    (if any) out, both durably, so that no index.json describes a mix of an old build's and a new one's
    shards. A crash between the two leaves the marker beside the old index, which still fits its shards."""
    atomic_write_text(
        out_dir / INCOMPLETE,
        f"A build of this split is under way or was interrupted: its shards may be a mix of two builds, and it has "
        f"no {INDEX} until the build finishes. Rerun `distpddm shards build` to finish it.\n",
    )
    (out_dir / INDEX).unlink(missing_ok=True)
    fsync_dir(out_dir)


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
        if (Path(split_dir) / INCOMPLETE).exists():
            raise IncompleteBuildError(incomplete_message(split_dir))
        raise FileNotFoundError(f"no {INDEX} in {split_dir}: build the shards first (distpddm shards build)")
    index = json.loads(path.read_text())
    if index.get("layout") == FOREIGN_LAYOUT:
        raise ValueError(foreign_message(split_dir))
    return index


def foreign_message(split_dir: str | Path) -> str:
    """Why a split that `distpddm shards index` wrote is refused: it has no hashes or class chunks to check."""
    return (
        f"{split_dir}: a pre-shuffled split indexed in place (`distpddm shards index`); `distpddm shards verify` "
        "checks the splits `distpddm shards build` writes"
    )


def _is_foreign(split_dir: Path) -> bool:
    try:
        return json.loads((split_dir / INDEX).read_text()).get("layout") == FOREIGN_LAYOUT
    except (OSError, ValueError, AttributeError):
        return False  # missing or damaged: verify_split reports it


def verify_split(split_dir: Path, sample: float = 1.0, seed: int = 0, progress: bool = True) -> VerifyReport:
    """Hashes, counts, labels in range and (a ``sample`` fraction of) images decoding, against the index."""
    import tarfile

    from PIL import Image

    split_dir = Path(split_dir)
    try:
        index = load_index(split_dir)
    except IncompleteBuildError as e:
        return VerifyReport(str(split_dir), problems=[str(e)])
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
        starts: list[int] = []  # where each sample's first header is, for the shard index
        unreadable = None
        with open(path, "rb") as raw:
            hashed = _HashingReader(raw)  # one read of the shard serves both the hash and the samples
            try:
                with tarfile.open(fileobj=hashed, mode="r|") as tar:
                    for member in tar:
                        if not member.isfile():  # a folder, a link, a device: no sample's field
                            problems.append(f"{shard['name']}: member {member.name} is not a file")
                            continue
                        key, _, field = member.name.partition(".")
                        if key not in samples:
                            starts.append(member.offset)
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
        problems += _check_shard_index(split_dir / idx_name(shard["name"]), starts, samples)
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
            images = [f for f in fields if f in IMAGE_EXTENSIONS]
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


def _check_shard_index(path: Path, starts: list[int], samples: dict[str, dict[str, bytes]]) -> list[str]:
    """The per-shard index must give every sample's offset and label, in order (readers seek with it)."""
    try:
        index = load_shard_index(str(path))
    except (OSError, ValueError, KeyError) as e:
        return [f"{path.name}: missing or unreadable shard index ({type(e).__name__}: {e}); rerun the build"]
    try:
        labels = [int(fields["cls"]) for fields in samples.values()]
    except (KeyError, ValueError):
        labels = None  # reported per sample
    if (
        len(index) != len(starts)
        or index.offsets[:-1].tolist() != starts
        or (labels and index.labels.tolist() != labels)
    ):
        return [f"{path.name}: does not match its shard (offsets or labels differ); rerun the build to rewrite it"]
    return []


def verify(out: Path, sample: float = 1.0, progress: bool = True) -> list[VerifyReport]:
    """Verify every split under ``out`` (folders holding an index.json), or ``out`` itself if it is one."""
    out = Path(out)
    if (out / INDEX).exists() or (out / INCOMPLETE).exists():
        dirs = [out]
    else:  # an interrupted build's split too: it is reported, not passed over
        dirs = sorted({p.parent for name in (INDEX, INCOMPLETE) for p in out.glob(f"*/{name}")})
    if not dirs:
        raise FileNotFoundError(f"no {INDEX} under {out}: nothing to verify")
    foreign = [d for d in dirs if _is_foreign(d)]
    if foreign:  # before any split is verified: not after minutes of reading the others
        raise ValueError(foreign_message(foreign[0]))
    return [verify_split(d, sample, progress=progress) for d in dirs]
