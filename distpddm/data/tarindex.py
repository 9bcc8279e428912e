"""WebDataset tar shards, sample by sample: writing them, indexing them, reading them at an offset.

Beside each ``shard-N.tar`` the builder writes ``shard-N.idx.npz``: ``offsets`` (n + 1 byte offsets: where
each sample's first tar header starts, then where the last sample ends) and ``labels`` (n). With it a reader
can start anywhere in a shard (disjoint sample ranges for more readers than shards), plan batches from
labels alone (a resumed stream replays its batches without reading images), and fetch single samples.

Samples are WebDataset's: members ``<key>.<ext>`` written one after another. They are written here with
:mod:`tarfile` itself (as ``webdataset.TarWriter`` does), because importing webdataset imports torch, which
every one of the builder's worker processes would then hold.
"""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BLOCK = 512
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's rule: key = path up to the basename's first dot


def idx_name(tar_name: str) -> str:
    return tar_name[: -len(".tar")] + ".idx.npz" if tar_name.endswith(".tar") else tar_name + ".idx.npz"


class SampleWriter:
    """Writes samples to a new tar file and records the index as it goes. Plain ustar headers: a fixed
    owner and an integer mtime (a float one makes tarfile add a PAX record to every member)."""

    def __init__(self, path: str | Path):
        self.tar = tarfile.open(path, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 -- closed in close()
        self.offsets: list[int] = []
        self.labels: list[int] = []

    def write(self, key: str, label: int, fields: dict[str, bytes]) -> None:
        """``fields``: extension -> bytes (``cls`` is added from ``label``); members in sorted order."""
        self.offsets.append(self.tar.offset)
        self.labels.append(label)
        for ext, data in sorted((fields | {"cls": str(label).encode()}).items()):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = "distpddm"
            self.tar.addfile(info, io.BytesIO(data))

    def close(self) -> ShardIndex:
        end = self.tar.offset  # before the end-of-archive blocks
        self.tar.close()
        return ShardIndex(np.array(self.offsets + [end], dtype=np.int64), np.array(self.labels, dtype=np.int64))


@dataclass(frozen=True)
class ShardIndex:
    offsets: np.ndarray  # int64 (n + 1,)
    labels: np.ndarray  # int64 (n,)

    def __len__(self) -> int:
        return len(self.labels)


def index_tar(path: str | Path) -> tuple[ShardIndex, list[str]]:
    """Scan a tar's headers (seeking past the data) -> its sample offsets, labels (``cls``) and keys."""
    offsets: list[int] = []
    labels: list[int] = []
    keys: list[str] = []
    end = 0
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            match = _KEY.match(member.name)
            if match is None:
                raise ValueError(f"{path}: member {member.name!r} has no key.extension name")
            key, ext = match.groups()
            if not keys or keys[-1] != key:
                offsets.append(member.offset)
                keys.append(key)
                labels.append(-1)
            if ext == "cls":
                labels[-1] = int(tar.extractfile(member).read())
            end = member.offset_data + -(-member.size // BLOCK) * BLOCK
    if any(label < 0 for label in labels):
        raise ValueError(f"{path}: sample {keys[labels.index(-1)]!r} has no .cls member")
    return ShardIndex(np.array(offsets + [end], dtype=np.int64), np.array(labels, dtype=np.int64)), keys


def save_index(index: ShardIndex, path: str | Path) -> None:
    """Written atomically and durably (fsynced before and after its rename)."""
    from ..durable import atomic_write_bytes

    buf = io.BytesIO()
    np.savez(buf, offsets=index.offsets, labels=index.labels)
    atomic_write_bytes(path, buf.getvalue())


def load_shard_index(url: str) -> ShardIndex:
    """A shard's ``.idx.npz`` from a local path or any fsspec URL. A missing file raises ``FileNotFoundError``;
    one that is damaged or inconsistent, ``ValueError``."""
    import fsspec

    with fsspec.open(url, "rb") as f:
        raw = f.read()
    try:
        with np.load(io.BytesIO(raw)) as data:
            index = ShardIndex(data["offsets"].astype(np.int64), data["labels"].astype(np.int64))
    except Exception as e:  # noqa: BLE001 -- zipfile, zlib, numpy: any damage reads the same to a caller
        raise ValueError(f"{url}: unreadable shard index ({type(e).__name__}: {e})") from None
    if len(index.offsets) != len(index.labels) + 1 or (np.diff(index.offsets) <= 0).any():
        raise ValueError(f"{url}: inconsistent shard index (offsets and labels do not fit together)")
    return index


def parse_sample(blob: bytes) -> dict[str, bytes]:
    """One sample's tar members (their bytes, end to end) -> ``{"__key__": key, ext: data, ...}``.

    Plain ustar headers (what the builder writes) are read with ``TarInfo.frombuf`` directly; anything else
    (PAX or GNU long-name records) goes through :mod:`tarfile`'s own reader."""
    sample: dict[str, bytes] = {}
    view = memoryview(blob)
    pos = 0
    while pos + BLOCK <= len(view):
        header = bytes(view[pos : pos + BLOCK])
        if not header.strip(b"\0"):
            break
        info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            return _parse_with_tarfile(blob)
        _add(sample, info.name, bytes(view[pos + BLOCK : pos + BLOCK + info.size]))
        pos += BLOCK + -(-info.size // BLOCK) * BLOCK
    return sample


def _parse_with_tarfile(blob: bytes) -> dict[str, bytes]:
    sample: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r|") as tar:
        for member in tar:
            if member.isfile():
                _add(sample, member.name, tar.extractfile(member).read())
    return sample


def _add(sample: dict, name: str, data: bytes) -> None:
    match = _KEY.match(name)
    if match is None:
        raise ValueError(f"tar member {name!r} has no key.extension name")
    key, ext = match.groups()
    if sample.setdefault("__key__", key) != key:
        raise ValueError(f"sample holds members of two keys ({sample['__key__']!r}, {key!r}): stale index?")
    sample[ext] = data


def read_range(f, index: ShardIndex, lo: int, hi: int) -> Iterator[tuple[int, dict | Exception]]:
    """Samples ``lo .. hi - 1`` of an open, seekable shard: ``(n, sample)``, or ``(n, exception)`` for a sample
    that does not parse or whose bytes do not read (an ``OSError``: the caller may retry from ``n``); the next
    sample is still looked for, from the index."""
    seek = True
    for n in range(lo, hi):
        size = int(index.offsets[n + 1] - index.offsets[n])
        try:
            if seek:
                f.seek(int(index.offsets[n]))
                seek = False
            blob = f.read(size)
            if len(blob) != size:
                raise EOFError(f"shard ends {size - len(blob)} bytes early")
            sample = parse_sample(blob)
        except (tarfile.TarError, ValueError, EOFError, UnicodeError, OSError) as e:
            seek = True
            yield n, e
            continue
        yield n, sample
