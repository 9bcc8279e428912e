"""Writes that survive a power loss: fsync a file or a folder, replace a file atomically and durably, and
commit a staged folder under its final name (a rename alone is atomic, not durable)."""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "commit_dir", "fsync_dir", "fsync_file"]

#: ``fsync`` on a folder is refused with these by some file systems (and platforms) that cannot do it.
_DIR_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES, errno.EISDIR}


def fsync_file(path: str | Path) -> None:
    """Flush a file's data and metadata to the disk (its bytes may have been written by another handle:
    ``fsync`` works on the file, not on the descriptor's buffer)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a folder's entries (files created, renamed or removed in it) durable. A file system that cannot
    fsync a folder (some network ones, Windows) is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        if e.errno in _DIR_FSYNC_UNSUPPORTED:
            return
        raise
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: written to a temporary file in the same folder, flushed and fsynced,
    renamed over ``path``, and the folder fsynced. Readers see the old file or the new one, never a part; after
    a crash, the new one is complete if it is there at all. The temporary file is removed if anything fails."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)  # umask applies
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded."""
    atomic_write_bytes(path, text.encode(encoding))


def commit_dir(staging: str | Path, final: str | Path) -> None:
    """Move a fully written folder into place durably: fsync every file and folder under ``staging`` (and it),
    rename it to ``final`` (which must not exist, or be an empty folder), and fsync the parent folder(s)."""
    staging, final = Path(staging), Path(final)
    for root, _dirs, files in os.walk(staging, topdown=False):
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                fsync_file(os.path.join(root, name))
        fsync_dir(root)
    os.rename(staging, final)
    fsync_dir(final.parent)
    if staging.parent.resolve() != final.parent.resolve():
        fsync_dir(staging.parent)
