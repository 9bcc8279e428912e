"""Checkpoints: where they persist (:class:`Persistence`: a local folder, or Ray Train's storage), what one
holds, and how a resumed run finds the newest one that is whole, so that it continues where the saved run
stood and never silently from an older state.

A checkpoint folder holds DeepSpeed's state (every rank its partition; optimiser included), the client state
(``distpddm_state.json``: step, learning-rate schedule, metrics, the untrained baseline, the config, the
split's digest), each rank's RNG states (``rng_rank<r>.json``) and data-stream position
(``data_rank<r>.json``), each rank's manifest of the files it wrote (``manifest_rank<r>.json``: sizes), and
rank 0's exported plain-PyTorch ``model.pt``. Only DeepSpeed's own files and ``model.pt`` are pickles (read
with ``weights_only`` where distpddm reads them); whoever can write the run folder can change what a resume
loads, so it must be trusted.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import random
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import RunConfig
from ..data.stream import StreamState
from ..dist import any_rank, barrier, rank_and_world
from ..durable import atomic_write_text, commit_dir, fsync_file
from ..errors import ConfigError
from ..model import export_model
from .schedule import Schedule

log = logging.getLogger("distpddm.train")

CLIENT_STATE = "distpddm_state.json"
TAG = "checkpoint"
STEP_DIR = re.compile(r"step-(\d+)")


class Persistence:
    """Where checkpoints go, and the ones a resumed run may start from."""

    @contextlib.contextmanager
    def candidates(self) -> Iterator[list[Path]]:
        """The committed checkpoints, newest first (the trainer takes the first that is whole)."""
        yield []

    def staging_dir(self, step: int) -> Path:
        """An empty folder for this rank to write the step's checkpoint into."""
        raise NotImplementedError

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        raise NotImplementedError


def _step_of(path: Path) -> int:
    match = STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else -1


class LocalPersistence(Persistence):
    """``<out>/checkpoints/step-<N>/``: written under a temporary name, every rank's files flushed to disk,
    renamed when every rank is done; ``latest`` (a one-line file) is replaced durably after that. Pruning
    keeps the ``keep`` newest up to the step just committed and never what ``latest`` names."""

    def __init__(self, out: Path, keep: int):
        self.root, self.keep = Path(out) / "checkpoints", keep

    def latest_name(self) -> str | None:
        pointer = self.root / "latest"
        try:
            return pointer.read_text().strip() or None
        except OSError:
            return None

    @contextlib.contextmanager
    def candidates(self) -> Iterator[list[Path]]:
        found = sorted((p for p in self.root.glob("step-*") if p.is_dir() and _step_of(p) >= 0), key=_step_of)
        named = self.latest_name()
        if found and named != found[-1].name and rank_and_world()[0] == 0:
            log.warning(
                "checkpoints/latest names %s, but %s is the newest committed checkpoint: it is tried first",
                named or "nothing", found[-1].name,
            )  # fmt: skip
        yield found[::-1]

    def staging_dir(self, step: int) -> Path:
        staging = self.root / f".tmp-step-{step:08d}"  # shared by every rank; the run folder is this run's own
        if rank_and_world()[0] == 0 and staging.exists():  # left by a crash while writing
            shutil.rmtree(staging)
        barrier()
        staging.mkdir(parents=True, exist_ok=True)
        return staging

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is None:
            return
        barrier()  # every rank's files are written and flushed (save_checkpoint fsyncs them)
        if rank_and_world()[0] == 0:
            final = self.root / checkpoint_dir.name.replace(".tmp-", "")
            if final.exists():  # a checkpoint of this step from an attempt that did not get further
                shutil.rmtree(final)
            commit_dir(checkpoint_dir, final)
            atomic_write_text(self.root / "latest", final.name)
            self._prune(final)
        barrier()

    def _prune(self, newest: Path) -> None:
        done = sorted((p for p in self.root.glob("step-*") if 0 <= _step_of(p) <= _step_of(newest)), key=_step_of)
        for old in done[: -self.keep]:
            if old != newest:
                shutil.rmtree(old, ignore_errors=True)
        for leftover in self.root.glob(".tmp-step-*"):  # of crashes while writing
            shutil.rmtree(leftover, ignore_errors=True)


class RayPersistence(Persistence):
    """``ray.train.report(..., checkpoint=...)``: Ray merges every worker's directory and keeps the last N."""

    @contextlib.contextmanager
    def candidates(self) -> Iterator[list[Path]]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield []
            return
        with ckpt.as_directory() as d:
            yield [Path(d)]

    def staging_dir(self, step: int) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"distpddm-step{step}-"))

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------- what each rank owns


def _owner(relative: str) -> int:
    """The rank that writes (and checks) a checkpoint file: DeepSpeed's ZeRO partitions and our per-rank files
    name it; the rest (the model states, the client state, model.pt) are rank 0's."""
    match = re.search(r"zero_pp_rank_(\d+)_|_rank(\d+)\.json$", relative)
    return int(next(g for g in match.groups() if g is not None)) if match else 0


def _files(folder: Path, rank: int) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("manifest_") and
        _owner(p.relative_to(folder).as_posix()) == rank
    )  # fmt: skip


def _write_manifest(folder: Path, rank: int) -> None:
    """Flush this rank's files to disk and list them with their sizes: a resume checks them against it."""
    files = _files(folder, rank)
    for path in files:
        fsync_file(path)
    sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in files}
    atomic_write_text(folder / f"manifest_rank{rank}.json", json.dumps(sizes, sort_keys=True))


def check_whole(folder: Path, rank: int) -> str | None:
    """Why this rank's part of a checkpoint cannot be loaded (None: it can): files missing or of another
    size than written, a zip archive (torch.save's format) whose CRCs fail, an unreadable client state.
    Nothing is unpickled."""
    manifest = folder / f"manifest_rank{rank}.json"
    if not manifest.is_file():
        if any(folder.glob("manifest_rank*.json")) or not (folder / CLIENT_STATE).is_file():
            return f"{folder.name}: no manifest of rank {rank}'s files (incomplete)"
        return None  # written before checkpoints had manifests: only loading it can tell
    try:
        sizes = json.loads(manifest.read_text())
        for name, size in sizes.items():
            path = folder / name
            have = path.stat().st_size if path.is_file() else None
            if have != size:
                return f"{folder.name}/{name}: missing or truncated ({have or 0} of {size} bytes)"
            if path.suffix in (".pt", ".pth") and zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                if bad is not None:
                    return f"{folder.name}/{name}: corrupt (member {bad} fails its CRC)"
        if rank == 0:
            json.loads((folder / CLIENT_STATE).read_text())
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        return f"{folder.name}: unreadable ({type(e).__name__}: {e})"
    return None


# ---------------------------------------------------------------------------------------- RNG, no pickle


def _rng_state() -> dict:
    """Every generator's state as JSON: nothing in a checkpoint that a resume reads runs code."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()

    def raw(t: torch.Tensor) -> str:
        return base64.b64encode(t.cpu().numpy().tobytes()).decode()

    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": raw(torch.get_rng_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = raw(torch.cuda.get_rng_state())  # this rank's device (stochastic depth, dropout)
    return state


def _set_rng_state(state: dict) -> None:
    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


# -------------------------------------------------------------------------------------------- save / load


@dataclass
class Resumed:
    """What a checkpoint says about where the run stood (a fresh run: step 0, nothing else)."""

    step: int = 0
    schedule: Schedule | None = None  # the saved run's schedule
    baseline: dict = field(default_factory=dict)  # the untrained network's validation metrics
    data: StreamState | None = None  # this rank's stream position
    source: Path | None = None  # the checkpoint it came from


def resume_latest(engine, persistence: Persistence, cfg: RunConfig, device: torch.device) -> Resumed:
    """Load the newest checkpoint that is whole on every rank, falling back over the older ones (saying so);
    a fresh start when there is none. Collective: every rank checks its part, and they agree."""
    rank, _ = rank_and_world()
    with persistence.candidates() as found:
        for ckpt in found:
            problem = check_whole(ckpt, rank)
            if any_rank(problem is not None, device):
                if problem is not None:
                    log.warning("checkpoint %s cannot be resumed from: %s; trying an older one", ckpt, problem)
                continue
            return load_checkpoint(engine, ckpt, cfg)
        if found and rank == 0:
            log.warning("none of the %d checkpoints is whole: starting from step 0", len(found))
    return Resumed()


def load_checkpoint(engine, ckpt: Path | None, cfg: RunConfig) -> Resumed:
    """Restore the engine (weights, optimiser) and this rank's RNG; return the rest for the caller to use."""
    if ckpt is None:
        return Resumed()
    rank, _ = rank_and_world()
    try:
        engine.load_checkpoint(str(ckpt), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
    except (KeyError, ValueError, RuntimeError) as e:  # whole files (checked), every rank alike: another layout
        raise ConfigError(
            f"the checkpoint {ckpt} does not fit this run (model, loss or parameter groups differ, or it was "
            f"written by an older distpddm: {type(e).__name__}: {str(e)[:200]}); resume it with its own config, "
            "or start a new run (another name=, or --fresh)"
        ) from None
    state = json.loads((ckpt / CLIENT_STATE).read_text())
    if "schedule" in state:
        schedule = Schedule.from_dict(state["schedule"])
    else:  # written before the schedule was saved: the one its config gave
        from ..config import from_dict

        schedule = Schedule.from_config(from_dict(state["config"]))
    rng_file = ckpt / f"rng_rank{rank}.json"
    if rng_file.exists():
        _set_rng_state(json.loads(rng_file.read_text()))
    elif (ckpt / f"rng_rank{rank}.pt").exists():  # a pickle of an older version: never unpickled
        log.warning("%s holds the RNG state as a pickle (an older distpddm): not loaded; the RNG restarts", ckpt)
    data_file = ckpt / f"data_rank{rank}.json"  # where this rank's stream stood: it continues from there
    if data_file.exists():
        data = StreamState.from_json(data_file.read_text())
    else:  # a rank the saved run did not have: all ranks start the epoch after the furthest one
        data = StreamState(layout={}, epoch_all=state.get("data_epoch", 0))
    return Resumed(state["step"], schedule, state.get("baseline", {}), data, ckpt)


def save_checkpoint(
    engine,
    persistence: Persistence,
    cfg: RunConfig,
    step: int,
    schedule: Schedule,
    stream: StreamState,
    metrics: dict,
    baseline: dict,
    metric: nn.Module | None = None,
    split_digest: str | None = None,
) -> Path:
    """A complete checkpoint in a staging folder, this rank's files flushed to disk and listed in its manifest
    (the persistence commits it when every rank is done); ``metric``, the loss holding a learned metric, is
    exported beside the network in ``model.pt``."""
    rank, _ = rank_and_world()
    staging = persistence.staging_dir(step)
    engine.save_checkpoint(str(staging), tag=TAG, client_state={"step": step})
    (staging / f"rng_rank{rank}.json").write_text(json.dumps(_rng_state()))
    (staging / f"data_rank{rank}.json").write_text(stream.to_json())
    if rank == 0:
        client = {
            "step": step,
            "schedule": schedule.to_dict(),
            "data_epoch": stream.epoch_all,
            "metrics": metrics,
            "baseline": baseline,
            "config": cfg.to_dict(),
            "split_digest": split_digest,
        }
        (staging / CLIENT_STATE).write_text(json.dumps(client))
        export_model(engine.module.net, staging / "model.pt", criterion=metric, image_size=cfg.data.image_size)
    _write_manifest(staging, rank)
    return staging
