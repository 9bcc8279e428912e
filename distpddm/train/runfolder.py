"""The run folder as one run's own: a lock its driver holds while the run lives, and the check that a rerun
resumes checkpoints made by the same run (config and split), not another's.

The lock is ``flock`` on ``<run>/.lock``: the kernel releases it when its holder exits, however it exits
(SIGKILL included); children forked while it is held (DataLoader workers) close their copy at once, so a
lingering child does not keep it. On NFS (v4, or v3 with lockd) Linux maps it to a byte-range lock the server
keeps: a client that crashes holds it until the server gives up on it (NFSv4: its lease, about 90 s). A file
system without working locks is refused in one line (``DISTPDDM_UNLOCKED=1`` runs without the lock, at the
user's risk). Object storage (``s3://``...) has no lock: there, one run per name is the user's to keep.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from ..config import RunConfig
from ..errors import ConfigError, DeterministicError
from ..paths import is_remote, run_location

LOCK = ".lock"

#: keys a resume may change (the rest must match the checkpoints' config): the length and schedule of the
#: run, Ray's placement, how often it logs, validates and checkpoints, and how it reads (not what it reads:
#: the split is compared by its digest)
RESUMABLE = (
    "train.steps", "optim.", "ray.", "train.log_every", "train.val_every", "train.val_at_start",
    "train.checkpoint_every", "train.keep_checkpoints", "train.progress", "train.nan_abort_after",
    "train.deepspeed", "data.train_shards", "data.val_shards", "data.val_max_images", "data.loader_workers",
    "data.max_skip_rate", "data.buffer_images",
)  # fmt: skip


class RunInUse(DeterministicError):
    """Another living process holds the run folder."""


class ResumeRefused(ConfigError):
    """The run folder's checkpoints were made by another config or split."""


_HELD: set[int] = set()  # lock fds of this process: a forked child closes its copies (_forget_in_child)


def _forget_in_child() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)  # the child's reference only: the parent still holds the lock
    _HELD.clear()


os.register_at_fork(after_in_child=_forget_in_child)


class RunLock:
    """``flock`` on ``<run>/.lock`` for as long as the ``with`` block runs (none on remote storage)."""

    def __init__(self, location: str):
        self.location, self.fd = location, None

    def __enter__(self) -> RunLock:
        if is_remote(self.location):
            return self
        import fcntl

        folder = Path(self.location)
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            raise RunInUse(
                f"the run folder {folder} is in use by a living run ({owner or 'owner unknown'}): wait for it to "
                "end, or start another with name= or --fresh"
            ) from None
        except OSError as e:  # ENOLCK, ENOSYS, EOPNOTSUPP: NFSv3 without lockd, some FUSE file systems
            os.close(fd)
            if os.environ.get("DISTPDDM_UNLOCKED") == "1":
                return self
            raise DeterministicError(
                f"cannot lock the run folder {folder} ({e.strerror or e}): its file system has no working locks; "
                "put ray.storage_path on one that has, or set DISTPDDM_UNLOCKED=1 to run unlocked (one run per "
                "name is then yours to keep)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode(), 0)
        self.fd = fd
        _HELD.add(fd)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            os.close(self.fd)  # releases the lock
            self.fd = None


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_differences(saved: dict, cfg: RunConfig, *, legacy: bool = False) -> list[str]:
    """``key: saved -> now`` for every key a resume may not change (:data:`RESUMABLE` may). A key the saved
    config lacks (added to distpddm since) counts as its default: an upgrade alone refuses no checkpoint. The
    parts' arguments compare with their defaults filled in (:func:`~distpddm.criterion.resolved`): a saved
    ``alpha: 0.5`` against a default that is now 0.25 is a difference. ``legacy``: ``saved`` was written before
    parts were recorded resolved; its unnamed arguments take the defaults of that time."""
    from ..criterion import resolved

    base = RunConfig().to_dict()
    old, new = _flat(resolved(base | saved, legacy=legacy)), _flat(resolved(cfg.to_dict()))
    default = _flat(base)
    old = {k: old.get(k, default.get(k)) for k in set(old) | set(new)}
    keys = sorted(k for k in old if not k.startswith(RESUMABLE) and k != "name")
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def newest_state(location: str) -> dict | None:
    """The client state of the run folder's newest checkpoint (``--local``'s ``checkpoints/step-N`` or Ray's
    ``checkpoint_<time>``), or None."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(location)
    found = fs.glob(f"{root}/checkpoints/step-*/distpddm_state.json") + fs.glob(
        f"{root}/checkpoint_*/distpddm_state.json"
    )

    def order(path: str) -> tuple:
        folder = path.rsplit("/", 2)[-2]
        return (1, int(folder[5:])) if folder.startswith("step-") and folder[5:].isdigit() else (0, folder)

    for path in sorted(found, key=order, reverse=True):
        try:
            return json.loads(fs.cat_file(path))
        except (OSError, ValueError):  # a damaged one: the trainer falls back over it too
            continue
    return None


def check_resume(cfg: RunConfig, split_digest: str | None, *, force: bool = False) -> dict | None:
    """Refuse (one line) to resume checkpoints of another config or split, unless ``force``; the newest
    checkpoint's state when there is one."""
    state = newest_state(cfg.output_location())
    if state is None or force:
        return state
    why = config_differences(state.get("config", {}), cfg, legacy=not state.get("config_resolved"))
    if split_digest and state.get("split_digest") and state["split_digest"] != split_digest:
        why.append(f"data.train_shards: another split (digest {state['split_digest']} -> {split_digest})")
    if why:
        raise ResumeRefused(
            f"{cfg.output_location()} holds checkpoints (step {state.get('step')}) of another run: "
            + "; ".join(why[:6]) + (f"; and {len(why) - 6} more" if len(why) > 6 else "")
            + ". Resume with its config, start anew with --fresh (a new folder), or --force"
        )  # fmt: skip
    return state


def fresh_name(cfg: RunConfig) -> str:
    """``name``, or the first ``name-N`` whose run folder does not exist yet."""
    import fsspec

    fs, _ = fsspec.core.url_to_fs(cfg.output_location())
    name, n = cfg.name, 1
    while fs.exists(run_location(cfg.ray.storage_path, name)):
        n += 1
        name = f"{cfg.name}-{n}"
    return name
