"""Where a run's own files live -- the resolved config, ``metrics.jsonl``, TensorBoard curves, the exported
``model.pt`` -- beside the checkpoints Ray keeps: ``<ray.storage_path>/<name>/``.

A local (or shared-filesystem) storage path is written in place. A remote one (``s3://``, ``gs://``, any
fsspec URL) is mirrored: the writer works in a local folder and copies it up (:meth:`RunOutput.push`) at
each checkpoint and at the end, after fetching what an earlier attempt left there (:meth:`RunOutput.pull`),
so a resumed run -- on whatever node -- appends to the same ``metrics.jsonl``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from ..durable import atomic_write_text
from ..paths import is_remote, run_location

__all__ = ["RunOutput", "is_remote", "run_location"]

log = logging.getLogger("distpddm.train")


class RunOutput:
    """A run folder; :attr:`local` is where to write. ``push`` / ``pull`` copy to / from remote storage and
    do nothing for a local one."""

    def __init__(self, location: str):
        self.location = location
        self.remote = is_remote(location)
        if self.remote:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(location)
            self.local = Path(tempfile.mkdtemp(prefix="distpddm-run-"))
        else:
            self.fs, self.root = None, location
            self.local = Path(location)
            self.local.mkdir(parents=True, exist_ok=True)

    def pull(self, *names: str) -> None:
        """Fetch these files from the remote run folder, where they exist."""
        if not self.remote:
            return
        for name in names:
            remote = f"{self.root}/{name}"
            if self.fs.exists(remote):
                (self.local / name).parent.mkdir(parents=True, exist_ok=True)
                self.fs.get_file(remote, str(self.local / name))

    def push(self) -> None:
        """Copy every file of the local mirror up (the whole file: metrics.jsonl holds earlier attempts' lines
        too, after :meth:`pull`)."""
        if not self.remote:
            return
        files = [p for p in sorted(self.local.rglob("*")) if p.is_file() and not p.name.startswith(".")
                 and not p.name.endswith(".tmp")]  # fmt: skip
        for path in files:
            remote = f"{self.root}/{path.relative_to(self.local).as_posix()}"
            self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(path), remote)
        log.debug("copied %d files to %s", len(files), self.location)

    def write_text(self, name: str, text: str) -> None:
        """A small file written straight to the run folder (remote or not), e.g. ``aborted.json``."""
        if self.remote:
            self.fs.makedirs(self.root, exist_ok=True)
            self.fs.pipe_file(f"{self.root}/{name}", text.encode())
        else:
            atomic_write_text(self.local / name, text)  # preempted.json must outlive a power loss too

    def read_text(self, name: str) -> str | None:
        if self.remote:
            path = f"{self.root}/{name}"
            return self.fs.cat_file(path).decode() if self.fs.exists(path) else None
        path = self.local / name
        return path.read_text() if path.exists() else None

    def remove(self, name: str) -> None:
        if self.remote:
            if self.fs.exists(f"{self.root}/{name}"):
                self.fs.rm_file(f"{self.root}/{name}")
        else:
            (self.local / name).unlink(missing_ok=True)

    def close(self) -> None:
        """Remove the local mirror of a remote run folder (after a last :meth:`push`)."""
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)
