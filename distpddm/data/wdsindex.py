"""Index published WebDataset shards in place (timm's ``imagenet-12k-wds`` and the like), without copying them.

Such releases are pre-shuffled: each sample is ``<key>.jpg`` (or ``.webp``), ``<key>.cls`` (the label as text)
and ``<key>.json`` (label, class name, sizes), and classes are spread over every shard rather than chunked as
:mod:`.shards` lays them out. Indexing reads each shard once, header by header: the small ``cls`` and ``json``
members are read, image bytes are skipped. On a store that serves byte ranges (a local disk, HTTP with Range,
S3) a header is fetched with a small window of bytes after it (``WINDOW``), which usually holds the sample's
``cls`` and ``json`` and the next image's header: about one request of a few KiB per sample, whatever the
image's size. A store that ignores ranges is read as one stream (every byte read once, nothing decoded).

Output, under ``OUT``:

* ``shard-index/<shard>.idx.npz``, one per source shard, written atomically when the shard is indexed (a rerun
  skips every shard whose file loads whole and names the same URL): the builder's ``offsets`` (n + 1) and
  ``labels`` (the source's ``cls``) of :mod:`.tarindex`, plus ``ends`` (each sample's end: bad samples left
  out may lie between two good ones), ``image_offsets``, ``image_sizes``, ``image_exts`` (where the image
  member's bytes are, for one range read), ``keys``, and ``meta`` (JSON: URL, size, bad samples, class names).
* ``<split>/index.json`` and ``<split>/samples-<digest>.npz``: the split (``train``, or what ``--classes``,
  ``--min-per-class`` and the builder's carving make of it): ``layout: "foreign"``, the source pattern, the
  class list, the shards with their URLs and per-shard index paths, and the selection (``shard``, ``row``,
  ``label``: which rows of which shard index, with the split's label). A reader locates every sample from
  these alone; ``layout`` tells the class-chunked stream of :mod:`.stream` that it cannot read the split.

Damaged or truncated tars, and shards that stay unreadable after :mod:`.retry`'s retries of a transient error
(HTTP 5xx, a timeout, a reset connection), are named and skipped, and so are samples with no image, no or a bad
``cls``, or a ``json`` that does not decode; both are counted, and past ``max_bad_shards`` / ``max_bad`` the
run stops (per-shard indexes written so far are kept for the rerun).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..durable import atomic_write_bytes, atomic_write_text
from .images import IMAGE_EXTENSIONS
from .ranges import read_full
from .retry import retry_after
from .shards import FOREIGN_LAYOUT, INDEX
from .tarindex import BLOCK, idx_name

log = logging.getLogger("distpddm.data")

LAYOUT = FOREIGN_LAYOUT
INDEX_VERSION = 1
SHARD_INDEX_DIR = "shard-index"
#: Bytes fetched with every header that is not already in hand: the sample's small members and the next header.
WINDOW = 4096
#: The largest ``cls`` or ``json`` member read; a bigger one is a damaged sample, not metadata.
MAX_SMALL_MEMBER = 1 << 20
#: Fields of a sample's ``json`` that may name its class, first found wins; else an ImageNet synset (wnid) that
#: starts the basename of its ``filename`` field, as timm's releases record it.
CLASS_NAME_FIELDS = ("class_name", "synset", "wnid", "class")
_WNID_FILE = re.compile(r"(?:^|/)(n\d{8})_[^/]*$")


class DamagedShardError(ValueError):
    """A tar that is not whole: a bad header checksum, a member running past the end, no end-of-archive."""


class TooManyBadError(ValueError):
    """More bad samples or shards than the thresholds allow."""


# ------------------------------------------------------------------------------------------- shard lists


def expand_braces(pattern: str) -> list[str]:
    """``a-{0000..0002}.tar`` -> three names (zero-padded as written), ``{x,y}`` -> two; several groups
    multiply. Numeric ranges only (``{a..c}`` is taken as a literal)."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        parts = [f"{n:0{width}d}" for n in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        parts = body.split(",")
    else:
        parts = ["{" + body + "}"]
    return [head + part + rest for part in parts for rest in expand_braces(tail)]


def shard_urls(spec: str) -> list[str]:
    """The shards a source names: a brace pattern (local or any fsspec URL), or a local folder of ``*.tar``.
    Local paths come back absolute, so that an index works from any folder."""
    if "://" not in spec and Path(spec).is_dir():
        urls = sorted(str(p.resolve()) for p in Path(spec).glob("*.tar"))
        if not urls:
            raise FileNotFoundError(f"no *.tar in {spec}")
        return urls
    urls = expand_braces(spec)
    if "://" not in spec:
        urls = [str(Path(u).resolve()) for u in urls]
    names = [u.rsplit("/", 1)[-1] for u in urls]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"{spec}: two shards share the name {dup!r}; their per-shard indexes would collide")
    return urls


# ------------------------------------------------------------------------------------------------ reading


def etag_of(info: dict) -> str | None:
    """The version tag in an fsspec ``info`` (HTTP's ``ETag`` header, S3's ``ETag``), quotes kept."""
    tag = info.get("ETag") or info.get("etag")
    return str(tag) if tag else None


class RangeReader:
    """Reads a shard at byte offsets through a small window: a read inside the bytes last fetched costs no
    request; any other fetches ``max(n, window)`` bytes from the offset. Local paths are read with ``open``;
    URLs through fsspec with its cache off (``cache_type="none"``: a read is exactly one range request). A
    server that ignores ranges is read forward as one stream instead. Transient errors reopen and retry."""

    def __init__(self, url: str, window: int = WINDOW):
        self.url, self.window = url, window
        self.requests = self.bytes_read = 0
        self.streaming = False
        self._file = None
        self._size: int | None = None
        self.etag: str | None = None  # a remote shard's, as its store reports it: a changed shard is noticed
        self._buf, self._buf_at = b"", 0
        self._stream_at = 0

    @property
    def size(self) -> int | None:
        if self._file is None:
            self._retrying(self._open)
        return self._size

    def _open(self) -> None:
        self.close()
        if "://" not in self.url:
            self._file = open(self.url, "rb", buffering=0)  # noqa: SIM115 -- closed in close()
            self._size = os.fstat(self._file.fileno()).st_size
            return
        import fsspec

        fs, path = fsspec.core.url_to_fs(self.url)
        if self.streaming:
            self._file = fs.open(path, "rb", block_size=0)
            self._stream_at = 0
        else:
            info = fs.info(path)  # one HEAD (or stat): the size, and the version tag that an open would drop
            etag = etag_of(info)
            if self.etag is not None and etag is not None and etag != self.etag:  # replaced while indexed
                raise DamagedShardError(f"{self.url}: changed while it was being indexed (ETag {self.etag} -> {etag})")
            self.etag = self.etag or etag
            size = info.get("size")
            self._file = fs.open(
                path, "rb", block_size=self.window, cache_type="none", **({"size": size} if size else {})
            )
            self._size = getattr(self._file, "size", None)
            if self._size is None:  # no Content-Length: only a stream can be read
                self.streaming = True
                self._stream_at = 0

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(Exception):  # a broken connection may not close cleanly
                self._file.close()
            self._file = None

    def _retrying(self, fn: Callable[[], bytes | None]):
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as e:
                if not retry_after(self.url, e, attempt):
                    raise
                attempt += 1
                self.close()

    def read_at(self, pos: int, n: int) -> bytes:
        """``n`` bytes at ``pos`` (fewer at the end of the file)."""
        buf_end = self._buf_at + len(self._buf)
        if self._buf_at <= pos and pos + n <= buf_end:
            return self._buf[pos - self._buf_at : pos - self._buf_at + n]
        head = self._buf[pos - self._buf_at :] if self._buf_at <= pos < buf_end else b""  # what is in hand
        start = pos + len(head)
        self._buf = head + self._retrying(lambda: self._fetch(start, max(n - len(head), self.window)))
        self._buf_at = pos
        return self._buf[:n]

    def _fetch(self, pos: int, n: int) -> bytes:
        if self._file is None:
            self._open()
        if not self.streaming:
            try:
                self._file.seek(pos)
                data = read_full(self._file, n)
            except ValueError as e:
                if "range requests" not in str(e):
                    raise
                log.warning("%s: the server ignores range requests; reading the shard as one stream", self.url)
                self.streaming = True
                self._open()
                return self._fetch(pos, n)
        else:
            if pos < self._stream_at:  # a retry after a reset connection: start the stream again
                self._open()
            while self._stream_at < pos:
                skipped = self._file.read(min(pos - self._stream_at, 1 << 20))
                if not skipped:
                    return b""
                self._count(skipped)
                self._stream_at += len(skipped)
            data = read_full(self._file, n)
            self._stream_at += len(data)
        self._count(data)
        return data

    def _count(self, data: bytes) -> None:
        self.requests += 1
        self.bytes_read += len(data)


# ------------------------------------------------------------------------------------------- tar headers


class Member(NamedTuple):
    name: str
    offset: int  # where its first header starts (a PAX or GNU long-name header before it included)
    data: int  # where its bytes start
    size: int
    is_file: bool

    @property
    def end(self) -> int:
        return self.data + -(-self.size // BLOCK) * BLOCK


_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_POSIX_MAGIC = b"ustar\x0000"


def parse_header(header: bytes) -> tuple[str, int, bytes]:
    """A 512-byte tar header -> (name, size, type), checksum checked. Reads only what indexing needs, several
    times faster than ``TarInfo.frombuf``, which it falls back to for base-256 sizes. ``ValueError`` if the
    checksum does not fit (or a field does not parse)."""
    checksum = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
    unsigned = sum(header) - sum(header[148:156]) + 256
    if checksum != unsigned and checksum not in tarfile.calc_chksums(header):
        raise ValueError("bad checksum")
    kind = header[156:157]
    if header[124] & 0x80:  # a base-256 size (over 8 GiB)
        size = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape").size
    else:
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    name = header[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if header[257:265] == _POSIX_MAGIC and header[345]:
        name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
    if kind == tarfile.AREGTYPE and name.endswith("/"):  # old V7 tar: a folder is a file named with a slash
        kind = tarfile.DIRTYPE
    return name, size, kind


def _pax_records(data: bytes, where: str) -> dict[str, str]:
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
            key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        except ValueError:
            raise DamagedShardError(f"{where}: unreadable PAX header") from None
        if length <= 0:
            raise DamagedShardError(f"{where}: unreadable PAX header")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def walk_tar(read_at: Callable[[int, int], bytes], size: int | None) -> Iterator[Member]:
    """The members of a tar, hopping from header to header (data is never read here). PAX and GNU long-name
    headers are folded into the member they describe. Raises :class:`DamagedShardError` on a bad header
    checksum, a member that runs past ``size`` (the file's length, when known) or a file that ends without its
    end-of-archive block."""
    pos, ext_start = 0, None
    name: str | None = None
    pax_size: int | None = None
    while True:
        header = read_at(pos, BLOCK)
        if len(header) < BLOCK:
            raise DamagedShardError(f"ends at byte {pos + len(header)} without the end-of-archive blocks (truncated)")
        if not header.strip(b"\0"):
            return
        try:
            own_name, own_size, kind = parse_header(header)
        except ValueError as e:
            raise DamagedShardError(f"unreadable tar header at byte {pos} ({e})") from None
        start = pos if ext_start is None else ext_start
        length = pax_size if pax_size is not None else own_size
        member = Member(name if name is not None else own_name, start, pos + BLOCK, length, kind in _REGULAR)
        if size is not None and member.data + member.size > size:
            raise DamagedShardError(
                f"member {member.name!r} at byte {start} runs past the end of the file ({size} bytes): truncated"
            )
        pos = member.end
        if kind in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
            records = _pax_records(read_at(member.data, own_size), f"byte {start}")
            name = records.get("path", name)
            pax_size = int(records["size"]) if "size" in records else pax_size
            ext_start = start
        elif kind == tarfile.GNUTYPE_LONGNAME:
            name = read_at(member.data, own_size).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            ext_start = start
        elif kind in (tarfile.GNUTYPE_LONGLINK, tarfile.XGLTYPE):
            ext_start = start if kind == tarfile.GNUTYPE_LONGLINK else ext_start
        else:
            yield member
            ext_start, name, pax_size = None, None, None


# ------------------------------------------------------------------------------------------------ samples


def split_name(name: str) -> tuple[str, str]:
    """``folder/a.b.jpg`` -> ``("folder/a.b", "jpg")``: the field is the last extension (lower case), so a key
    may hold dots (webdataset's own rule, the basename's first dot, would cut such a key short)."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return name, ""
    key, _, ext = name.rpartition(".")
    return key, ext.lower()


@dataclass
class ShardIndex:
    """One shard's good samples (arrays of equal length) and what was wrong with the others."""

    url: str
    size: int | None
    etag: str | None = None
    keys: list[str] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    image_offsets: list[int] = field(default_factory=list)
    image_sizes: list[int] = field(default_factory=list)
    image_exts: list[str] = field(default_factory=list)
    class_names: dict[int, str] = field(default_factory=dict)
    bad_samples: list[dict] = field(default_factory=list)
    requests: int = 0
    bytes_read: int = 0

    def __len__(self) -> int:
        return len(self.labels)


def _sample_record(key: str, members: list[Member], small: dict[str, bytes | None]) -> tuple[dict | None, str | None]:
    """A sample's entry, or why it is bad."""
    exts = [split_name(m.name)[1] for m in members]
    dup = next((e for e in exts if exts.count(e) > 1), None)
    if dup is not None:
        return None, f"two {dup!r} members"
    images = [m for m, e in zip(members, exts, strict=True) if e in IMAGE_EXTENSIONS]
    if not images:
        return None, "no image member"
    if "cls" not in small:
        return None, "no cls member"
    too_big = next((e for e, data in small.items() if data is None), None)
    if too_big is not None:
        return None, f"its {too_big} member is larger than {MAX_SMALL_MEMBER} bytes"
    try:
        label = int(small["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None, f"cls {small['cls'][:20]!r} is not an integer"
    if label < 0:
        return None, f"cls {label} is negative"
    name = None
    if "json" in small:
        try:
            meta = json.loads(small["json"])
        except ValueError as e:  # a UnicodeDecodeError too
            return None, f"json does not decode ({type(e).__name__}: {e})"
        if not isinstance(meta, dict):
            return None, f"json is a {type(meta).__name__}, not an object"
        if isinstance(meta.get("label"), int) and meta["label"] != label:  # a label of another kind is not ours
            return None, f"json says label {meta['label']}, cls says {label}"
        name = next((meta[f] for f in CLASS_NAME_FIELDS if isinstance(meta.get(f), str)), None)
        if name is None and isinstance(meta.get("filename"), str):  # timm's: n01440764_10026.JPEG
            wnid = _WNID_FILE.search(meta["filename"])
            name = wnid.group(1) if wnid else None
    image = images[0]
    ext = split_name(image.name)[1]
    return {
        "key": key,
        "start": members[0].offset,
        "end": members[-1].end,
        "label": label,
        "name": name,
        "image": (image.data, image.size, ext),
    }, None


def index_shard(url: str, window: int = WINDOW) -> ShardIndex:
    """Walk one shard's headers and read its ``cls`` and ``json`` members (never its images). Raises
    :class:`DamagedShardError` for a tar that is not whole, and the read error for one that cannot be read."""
    reader = RangeReader(url, window)
    try:
        out = ShardIndex(url, reader.size, reader.etag)
        key: str | None = None
        members: list[Member] = []
        small: dict[str, bytes | None] = {}

        def finish() -> None:
            record, why = _sample_record(key, members, small)
            if why is not None:
                out.bad_samples.append({"url": url, "key": key, "error": why})
                return
            out.keys.append(record["key"])
            out.starts.append(record["start"])
            out.ends.append(record["end"])
            out.labels.append(record["label"])
            offset, size, ext = record["image"]
            out.image_offsets.append(offset)
            out.image_sizes.append(size)
            out.image_exts.append(ext)
            if record["name"] is not None:
                out.class_names.setdefault(record["label"], record["name"])

        for member in walk_tar(reader.read_at, out.size if not reader.streaming else None):
            if not member.is_file:
                continue
            member_key, ext = split_name(member.name)
            if member_key != key:
                if members:
                    finish()
                key, members, small = member_key, [], {}
            members.append(member)
            if ext in ("cls", "json"):  # read now: its bytes are in the window just fetched
                small[ext] = reader.read_at(member.data, member.size) if member.size <= MAX_SMALL_MEMBER else None
        if members:
            finish()
        out.requests, out.bytes_read = reader.requests, reader.bytes_read
        return out
    finally:
        reader.close()


# ------------------------------------------------------------------------------------- per-shard indexes


def shard_index_path(out: Path, url: str) -> Path:
    return Path(out) / SHARD_INDEX_DIR / idx_name(url.rsplit("/", 1)[-1])


def save_shard_index(index: ShardIndex, path: Path) -> None:
    """The builder's ``offsets`` and ``labels`` and the rest (see the module's docstring), atomically."""
    n = len(index)
    end = index.ends[-1] if n else 0
    meta = {
        "version": INDEX_VERSION,
        "url": index.url,
        "bytes": index.size,
        "etag": index.etag,
        "bad_samples": index.bad_samples,
        "class_names": {str(k): v for k, v in sorted(index.class_names.items())},
        "requests": index.requests,
        "bytes_read": index.bytes_read,
    }
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        offsets=np.array(index.starts + [end], dtype=np.int64),
        ends=np.array(index.ends, dtype=np.int64),
        labels=np.array(index.labels, dtype=np.int64),
        image_offsets=np.array(index.image_offsets, dtype=np.int64),
        image_sizes=np.array(index.image_sizes, dtype=np.int64),
        image_exts=np.array(index.image_exts, dtype=str) if n else np.zeros(0, "U4"),
        keys=np.array(index.keys, dtype=str) if n else np.zeros(0, "U1"),
        meta=np.array(json.dumps(meta)),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def load_shard_meta(path: Path) -> tuple[dict, np.ndarray]:
    """A per-shard index's ``meta`` and ``labels``; ``ValueError`` if it does not load whole."""
    try:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            labels = data["labels"].astype(np.int64)
            if len(data["offsets"]) != len(labels) + 1 or len(data["ends"]) != len(labels):
                raise ValueError("arrays of different lengths")
    except Exception as e:  # noqa: BLE001 -- a torn or foreign file reads the same: index the shard again
        raise ValueError(f"{path}: unreadable shard index ({type(e).__name__}: {e})") from None
    return meta, labels


# ------------------------------------------------------------------------------------------ class tables


def read_names_file(path: str | Path) -> list[str]:
    """One class name a line (its first word: ``n01440764 tench`` is ``n01440764``); blank lines skipped."""
    return [line.split()[0] for line in Path(path).read_text().splitlines() if line.strip()]


def class_table(n_labels: int, json_names: dict[int, str], names_file: list[str] | None) -> list[str]:
    """Source label -> class name: from the mapping file (line n names label n), else the ``json`` members,
    else the label itself. Names must be unique (subsets and held-out classes are given by name)."""
    if names_file is not None:
        if len(names_file) < n_labels:
            raise ValueError(f"the class-name file names {len(names_file)} classes, but label {n_labels - 1} occurs")
        names = list(names_file)
    else:
        names = [json_names.get(n, str(n)) for n in range(n_labels)]
    seen: dict[str, int] = {}
    for n, name in enumerate(names):
        if name in seen:
            raise ValueError(f"class name {name!r} names labels {seen[name]} and {n}; give --class-names FILE")
        seen[name] = n
    return names


# ------------------------------------------------------------------------------------- subset and carving


@dataclass
class SplitRows:
    """A split as rows of the whole sample table, its class list and each row's label in it."""

    rows: np.ndarray  # int64, ascending
    classes: list[str]
    labels: np.ndarray  # int64


def select_classes(
    labels: np.ndarray, names: list[str], subset: list[str] | None = None, min_per_class: int = 1
) -> SplitRows:
    """The rows of the classes in ``subset`` (all if None) with at least ``min_per_class`` samples, labelled
    0.. in source-label order."""
    keep = np.ones(len(names), dtype=bool)
    if subset is not None:
        position = {c: n for n, c in enumerate(names)}
        unknown = [c for c in subset if c not in position]
        if unknown:
            raise ValueError(f"--classes names {len(unknown)} class(es) not in the shards: {', '.join(unknown[:5])}")
        keep[:] = False
        keep[[position[c] for c in subset]] = True
    counts = np.bincount(labels, minlength=len(names))
    keep &= counts >= max(min_per_class, 1)
    if not keep.any():
        raise ValueError("no class is left after --classes and --min-per-class")
    new_label = np.cumsum(keep) - 1
    rows = np.flatnonzero(keep[labels])
    return SplitRows(rows, [c for c, k in zip(names, keep, strict=True) if k], new_label[labels[rows]])


def carve_rows(
    split: SplitRows,
    val_per_class: int | None = None,
    holdout: float | list[str] | None = None,
    seed: int = 0,
    name: str = "train",
) -> tuple[dict[str, SplitRows], dict]:
    """The builder's carving (:func:`.sources.carve`: the same draws from the same seed give the same
    classes and images) on label arrays: held-out classes into ``holdout``, then ``val_per_class`` images of
    each remaining class into ``val`` (at most half of a class). Returns the splits and the carving record."""
    from .sources import SourceError, choose_holdout, choose_val

    splits = {name: split}
    carving: dict = {}
    if val_per_class is None and holdout is None:
        return splits, carving
    rng = np.random.default_rng(seed)
    carving["seed"] = seed
    train = split
    n_classes = len(train.classes)
    if holdout is not None:
        held = choose_holdout(train.classes, holdout, rng, carving)
        to_held = np.full(n_classes, -1)
        to_held[held] = np.arange(len(held))
        is_held = to_held >= 0
        out = is_held[train.labels]
        splits["holdout"] = SplitRows(
            train.rows[out], [train.classes[n] for n in held], to_held[train.labels[out]].astype(np.int64)
        )
        new_label = np.cumsum(~is_held) - 1
        kept = [c for c, h in zip(train.classes, is_held, strict=True) if not h]
        train = SplitRows(train.rows[~out], kept, new_label[train.labels[~out]].astype(np.int64))
        splits[name] = train
        carving["holdout_classes"] = len(held)
    if val_per_class is not None:
        if name == "val":
            raise SourceError("the split is already named val; --val-per-class carves a val split out of another")
        to_val = choose_val(train.labels, len(train.classes), val_per_class, rng)
        splits["val"] = SplitRows(train.rows[to_val], train.classes, train.labels[to_val])
        splits[name] = SplitRows(train.rows[~to_val], train.classes, train.labels[~to_val])
        carving["val_per_class"] = val_per_class
    return splits, carving


# ------------------------------------------------------------------------------------------------ the run


@dataclass(frozen=True)
class IndexOptions:
    split: str = "train"
    class_names: Path | None = None  # a mapping file: line n names label n
    classes: Path | None = None  # a subset: one class name a line
    min_per_class: int = 1
    val_per_class: int | None = None
    holdout: float | list[str] | None = None
    seed: int = 0
    workers: int = 16  # threads: the work is waiting on reads
    window: int = WINDOW
    max_bad: float = 0.001  # bad samples: a count, or a fraction of the samples if < 1
    max_bad_shards: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.split in ("", SHARD_INDEX_DIR) or "/" in self.split:
            raise ValueError(f"--split {self.split!r} cannot name a split folder")
        if self.min_per_class < 1:
            raise ValueError(f"--min-per-class must be >= 1, got {self.min_per_class}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.window < BLOCK:
            raise ValueError(f"--window must be at least {BLOCK} bytes, got {self.window}")
        if self.max_bad < 0 or self.max_bad_shards < 0:
            raise ValueError("--max-bad and --max-bad-shards must be >= 0")

    def bad_allowed(self, total: int) -> int:
        return int(self.max_bad) if self.max_bad >= 1 else math.ceil(self.max_bad * total)


@dataclass
class IndexSummary:
    shards: int = 0
    indexed: int = 0  # this run
    skipped: int = 0  # already indexed by an earlier run
    samples: int = 0  # good samples in every shard
    bytes_read: int = 0  # this run
    shard_bytes: int = 0  # this run's shards, in all
    bad_shards: list[dict] = field(default_factory=list)
    bad_samples: list[dict] = field(default_factory=list)
    splits: dict[str, dict] = field(default_factory=dict)


def _index_one(url: str, path: Path, window: int) -> ShardIndex | Exception:
    """The shard's index, saved; or why the shard cannot be indexed (returned: it is counted, not raised).
    An error writing the index is raised: it is about ``OUT``, not the shard."""
    try:
        index = index_shard(url, window)
    except Exception as e:  # noqa: BLE001 -- a damaged tar, or reads that stayed failing: named and counted
        return e
    save_shard_index(index, path)
    return index


def index_shards(spec: str, out: str | Path, options: IndexOptions | None = None) -> IndexSummary:
    """Index every shard ``spec`` names into ``out`` (skipping those already indexed), then write the splits.
    Raises :class:`TooManyBadError` past the thresholds, after every shard has been tried."""
    from tqdm.auto import tqdm

    options = options or IndexOptions()
    out = Path(out)
    urls = shard_urls(spec)
    if "://" not in spec and not any(os.path.exists(u) for u in urls):
        raise FileNotFoundError(f"{spec}: no such shards (the first would be {urls[0]})")
    summary = IndexSummary(shards=len(urls))
    metas: dict[int, dict] = {}
    labels: dict[int, np.ndarray] = {}
    todo = []
    for n, url in enumerate(urls):
        path = shard_index_path(out, url)
        if path.exists():
            try:
                meta, lab = load_shard_meta(path)
                if meta.get("url") == url and meta.get("version") == INDEX_VERSION:
                    metas[n], labels[n] = meta, lab
                    summary.skipped += 1
                    continue
            except ValueError as e:
                log.warning("%s; indexing the shard again", e)
        todo.append(n)
    bar = tqdm(total=len(urls), initial=summary.skipped, disable=not options.progress, unit="shard", desc="index")
    with ThreadPoolExecutor(min(options.workers, max(len(todo), 1))) as pool:
        futures = {pool.submit(_index_one, urls[n], shard_index_path(out, urls[n]), options.window): n for n in todo}
        try:
            for fut in as_completed(futures):
                n = futures[fut]
                bar.update(1)
                index = fut.result()  # raises only if writing to OUT failed
                if isinstance(index, Exception):
                    why = str(index) if isinstance(index, DamagedShardError) else _describe(index)
                    summary.bad_shards.append({"url": urls[n], "error": why})
                    log.warning("skipping shard %s: %s", urls[n], why)
                    continue
                summary.indexed += 1
                summary.bytes_read += index.bytes_read
                summary.shard_bytes += index.size or 0
                metas[n], labels[n] = load_shard_meta(shard_index_path(out, urls[n]))
        except BaseException:  # OUT not writable, or ^C: stop now; the shards finished are kept
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    bar.close()
    good = sorted(metas)
    for n in good:
        summary.bad_samples += metas[n]["bad_samples"]
        summary.samples += len(labels[n])
    summary.bad_shards.sort(key=lambda b: b["url"])
    _check_thresholds(summary, options)
    summary.splits = write_splits(
        spec,
        out,
        [urls[n] for n in good],
        [metas[n] for n in good],
        [labels[n] for n in good],
        options,
        summary.bad_shards,
    )
    return summary


def _describe(error: BaseException) -> str:
    """An error and its first cause (fsspec words a failed HEAD's 503 as a bare ``FileNotFoundError``)."""
    text = f"{type(error).__name__}: {error}"
    cause = error.__cause__ or error.__context__
    return text if cause is None else f"{text} ({type(cause).__name__}: {cause})"


def _check_thresholds(summary: IndexSummary, options: IndexOptions) -> None:
    bad = summary.bad_shards
    if len(bad) > options.max_bad_shards:
        raise TooManyBadError(
            f"{len(bad)} of {summary.shards} shards are damaged or unreadable, more than --max-bad-shards allows "
            f"({options.max_bad_shards}); first: "
            + "; ".join(f"{b['url']} ({b['error']})" for b in bad[:5])
            + ". Indexed shards are kept: fix or re-download these and rerun, or raise --max-bad-shards."
        )
    samples = summary.bad_samples
    allowed = options.bad_allowed(summary.samples + len(samples))
    if len(samples) > allowed:
        raise TooManyBadError(
            f"{len(samples)} samples are bad (no image, no or a bad cls, a json that does not decode), more than "
            f"--max-bad allows ({allowed} of {summary.samples + len(samples)}); first: "
            + "; ".join(f"{b['url']}:{b['key']} ({b['error']})" for b in samples[:5])
            + ". Indexed shards are kept: raise --max-bad if the loss is acceptable, and rerun."
        )


def write_splits(
    spec: str,
    out: Path,
    urls: list[str],
    metas: list[dict],
    labels: list[np.ndarray],
    options: IndexOptions,
    bad_shards: list[dict] | None = None,
) -> dict[str, dict]:
    """From the per-shard labels alone: the class table, the subset, the carving, and each split's
    ``index.json`` with its selection file. Splits an earlier run wrote and this one does not are removed."""
    all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    shard_of = np.repeat(np.arange(len(labels)), [len(x) for x in labels])
    row_of = np.concatenate([np.arange(len(x)) for x in labels]) if labels else np.zeros(0, np.int64)
    json_names: dict[int, str] = {}
    conflicts = 0
    for meta in metas:
        for k, v in meta["class_names"].items():
            conflicts += json_names.setdefault(int(k), v) != v
    if conflicts and options.class_names is None:
        log.warning(
            "%d labels are named differently by the json of different shards; the first name is kept "
            "(give --class-names FILE to name them)",
            conflicts,
        )
    names_file = read_names_file(options.class_names) if options.class_names is not None else None
    n_labels = int(all_labels.max()) + 1 if len(all_labels) else 0
    names = class_table(max(n_labels, len(names_file or [])), json_names, names_file)
    position = {c: n for n, c in enumerate(names)}
    subset = read_names_file(options.classes) if options.classes is not None else None
    base = select_classes(all_labels, names, subset, options.min_per_class)
    splits, carving = carve_rows(base, options.val_per_class, options.holdout, options.seed, options.split)
    bad_samples = [b for m in metas for b in m["bad_samples"]]
    written = {}
    for split, rows in splits.items():
        split_dir = out / split
        split_dir.mkdir(parents=True, exist_ok=True)
        shard_numbers, local = np.unique(shard_of[rows.rows], return_inverse=True)
        selection = io.BytesIO()
        np.savez_compressed(
            selection,
            shard=local.astype(np.int32),
            row=row_of[rows.rows].astype(np.int32),
            label=rows.labels.astype(np.int32),
        )
        data = selection.getvalue()
        selection_name = f"samples-{hashlib.sha256(data).hexdigest()[:16]}.npz"
        atomic_write_bytes(split_dir / selection_name, data)
        per_shard = np.bincount(local, minlength=len(shard_numbers))
        index = {
            "version": INDEX_VERSION,
            "layout": LAYOUT,
            "split": split,
            "source": spec if "://" in spec else str(Path(spec).resolve()),
            "samples": int(len(rows.rows)),
            "classes": rows.classes,
            "class_counts": np.bincount(rows.labels, minlength=len(rows.classes)).tolist(),
            "source_labels": [position[c] for c in rows.classes],
            "selection": selection_name,
            "subset": {
                "classes_file": str(options.classes) if options.classes is not None else None,
                "class_names_file": str(options.class_names) if options.class_names is not None else None,
                "min_per_class": options.min_per_class,
            },
            "carving": carving,
            "shards": [
                {
                    "name": urls[s].rsplit("/", 1)[-1],
                    "url": urls[s],
                    "index": f"../{SHARD_INDEX_DIR}/{idx_name(urls[s].rsplit('/', 1)[-1])}",
                    "samples": int(count),  # of this split
                    "indexed": int(len(labels[s])),  # good samples in the shard, of any split
                    "bytes": metas[s]["bytes"],
                    "etag": metas[s].get("etag"),
                }
                for s, count in zip(shard_numbers.tolist(), per_shard.tolist(), strict=True)
            ],
            "bad_samples": len(bad_samples),  # named in the per-shard indexes' meta
            "bad_shards": bad_shards or [],
        }
        atomic_write_text(split_dir / INDEX, json.dumps(index, indent=1))
        for old in split_dir.glob("samples-*.npz"):
            if old.name != selection_name:
                old.unlink(missing_ok=True)
        written[split] = index
    for stale in out.glob(f"*/{INDEX}"):
        if stale.parent.name not in splits and _is_foreign(stale):
            stale.unlink()
            for old in stale.parent.glob("samples-*.npz"):
                old.unlink(missing_ok=True)
    return written


def _is_foreign(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("layout") == LAYOUT
    except (OSError, ValueError):
        return False
