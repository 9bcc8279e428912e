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
import itertools
import json
import logging
import random
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import RunConfig
from ..criterion import resolved
from ..data.retry import retry_after
from ..data.stream import StreamState
from ..dist import agree, any_rank, barrier, broadcast_object, rank_and_world
from ..durable import atomic_write_text, commit_dir, fsync_file
from ..errors import ConfigError, DeterministicError
from ..model import export_model
from .schedule import Schedule

log = logging.getLogger("distpddm.train")

CLIENT_STATE = "distpddm_state.json"
TAG = "checkpoint"
STEP_DIR = re.compile(r"step-(\d+)")
MANIFEST = re.compile(r"manifest_rank(\d+)\.json")


class Persistence:
    """Where checkpoints go, and the ones a resumed run may start from."""

    @contextlib.contextmanager
    def candidates(self) -> Iterator[Iterable[Path]]:
        """The committed checkpoints, newest first (the trainer takes the first that is whole); the same on
        every rank."""
        yield []

    def staging_dir(self, step: int) -> Path:
        """An empty folder for this rank to write the step's checkpoint into."""
        raise NotImplementedError

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        raise NotImplementedError


def _saved_step(fs, folder: str) -> int:
    """The step a checkpoint folder's client state names; -1 when it cannot say (tried last)."""
    try:
        return int(json.loads(fs.cat_file(f"{folder}/{CLIENT_STATE}"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


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
        """What ``latest`` names; None where it is missing or unreadable (a write cut short can leave bytes that
        are not text): the folders themselves say what is committed."""
        pointer = self.root / "latest"
        try:
            return pointer.read_text().strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    @contextlib.contextmanager
    def candidates(self) -> Iterator[list[Path]]:
        """Every ``step-<N>`` folder, newest step first; rank 0's listing, the same on every rank. A folder is
        renamed into place only when every rank's files are on disk, so the newest whole one is the last commit
        even where ``latest`` lags it (a kill between the rename and ``latest``'s replacement); a folder an
        abandoned attempt left damaged fails its check and the next is tried."""
        names = None
        if rank_and_world()[0] == 0:
            names = sorted((p.name for p in self.root.glob("step-*") if p.is_dir() and _step_of(p) >= 0),
                           key=lambda n: _step_of(Path(n)), reverse=True)  # fmt: skip
            named = self.latest_name()
            if names and named != names[0]:
                log.info("checkpoints/latest names %s; the highest step, %s, is tried first", named or "nothing",
                         names[0])  # fmt: skip
        yield [self.root / n for n in broadcast_object(names)]

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
    """``ray.train.report(..., checkpoint=...)``: Ray merges every worker's directory and keeps the last N. A
    resume tries the run folder's ``checkpoint_*`` folders by the step each holds, newest first, each fetched
    only when it is tried: a driver killed after the workers wrote a checkpoint but before Ray registered it
    leaves a whole one newer than Ray's latest (the fault bench's ``kill_driver``)."""

    def __init__(self, location: str):
        self.location = location.rstrip("/")

    @contextlib.contextmanager
    def candidates(self) -> Iterator[Iterable[Path]]:
        import ray.train

        latest, names = ray.train.get_checkpoint(), None
        if rank_and_world()[0] == 0:
            import fsspec

            try:
                fs, root = fsspec.core.url_to_fs(self.location)
                found = [p.rsplit("/", 1)[-1] for p in fs.glob(f"{root}/checkpoint_*") if fs.isdir(p)]
                names = sorted(found, key=lambda n: (_saved_step(fs, f"{root}/{n}"), n), reverse=True)
            except (OSError, ValueError, ImportError) as e:  # a store fsspec cannot list: Ray's latest alone
                log.warning("cannot list checkpoints in %s (%s): none tried past Ray's latest", self.location, e)
                names = []
        names = broadcast_object(names)
        first = latest.path.rstrip("/").rsplit("/", 1)[-1] if latest is not None else None
        with contextlib.ExitStack() as stack:

            def each() -> Iterator[Path]:
                if latest is not None and first not in names:  # not in the run folder's listing: first
                    yield Path(stack.enter_context(latest.as_directory()))
                for name in names:
                    found = latest if name == first else ray.train.Checkpoint(f"{self.location}/{name}")
                    yield Path(stack.enter_context(found.as_directory()))

            yield each()

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
    """This rank's files; never a dot-file (another rank's atomic write in progress, none of its business)."""
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(("manifest_", ".")) and
        _owner(p.relative_to(folder).as_posix()) == rank
    )  # fmt: skip


def _write_manifest(folder: Path, rank: int) -> None:
    """Flush this rank's files to disk and list them with their sizes: a resume checks them against it."""
    files = _files(folder, rank)
    for path in files:
        fsync_file(path)
    sizes = {p.relative_to(folder).as_posix(): p.stat().st_size for p in files}
    atomic_write_text(folder / f"manifest_rank{rank}.json", json.dumps(sizes, sort_keys=True))


class CheckpointUnreadable(OSError):
    """A checkpoint the storage would not let us read (after retries): not damage, so no falling back."""


class CheckpointUnwritable(DeterministicError):
    """A checkpoint some rank could not write (a full disk): every rank stops, the last committed one stays.
    Not retried on Ray: the next attempt would train to the same checkpoint and fail again."""


#: torch.save's messages for a write that failed (a full disk), told apart from a collective's RuntimeError.
WRITE_FAILED = re.compile(r"enforce fail|unexpected pos|PytorchStreamWriter|No space left|write", re.IGNORECASE)


def _saved_world(folder: Path) -> int | None:
    """How many ranks wrote the checkpoint: its client state says, or (older ones) its manifests count."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        return int(json.loads((folder / CLIENT_STATE).read_text())["world"])
    ranks = [int(m.group(1)) for p in folder.glob("manifest_rank*.json") if (m := MANIFEST.fullmatch(p.name))]
    return max(ranks) + 1 if ranks else None


def check_whole(folder: Path, rank: int, world: int = 1) -> str | None:
    """Why a checkpoint cannot be loaded (None: it can), judged by this rank for its share of the saved ranks
    (``rank``, ``rank + world``, ...: a run resumed on fewer or more workers still checks every file once):
    files missing or of another size than written, a zip archive (torch.save's format) whose CRCs fail, an
    unreadable client state. Reads every byte of its files; unpickles nothing. An I/O error that persists
    over retries raises :class:`CheckpointUnreadable`: the storage, not the checkpoint, is at fault."""
    for attempt in itertools.count():
        try:
            return _check_whole(folder, rank, world)
        except FileNotFoundError as e:
            return f"{folder.name}: {e.filename or e} vanished while checked"
        except OSError as e:  # waits and says so as every read of data does (data/retry.py)
            if not retry_after(str(folder), e, attempt):
                raise CheckpointUnreadable(f"{folder}: {type(e).__name__}: {e}") from None
        except Exception as e:  # damage of any kind is a verdict, never an exception: every rank must vote
            return f"{folder.name}: unreadable ({type(e).__name__}: {e})"
    return None  # not reached


def _check_whole(folder: Path, rank: int, world: int) -> str | None:
    saved = _saved_world(folder)
    if saved is None:  # no manifest at all
        if not (folder / CLIENT_STATE).is_file():
            return f"{folder.name}: no client state and no manifests (incomplete)"
        return None  # written before checkpoints had manifests: only loading it can tell
    for r in range(rank, saved, world):
        manifest = folder / f"manifest_rank{r}.json"
        if not manifest.is_file():
            return f"{folder.name}: no manifest of rank {r}'s files (incomplete)"
        for name, size in json.loads(manifest.read_text()).items():
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
    """Load the newest checkpoint that is whole on every rank, falling back over damaged ones (saying so); a
    fresh start only when there is none at all. Checkpoints that are all damaged, or storage that will not
    answer, stop the run: starting over at step 0 beside them would hide lost work. Collective."""
    rank, world = rank_and_world()
    with persistence.candidates() as found:
        problems = []
        for ckpt in found:
            problem, unreadable = None, None
            try:
                problem = check_whole(ckpt, rank, world)
            except CheckpointUnreadable as e:
                unreadable = str(e)
            if any_rank(unreadable is not None, device):
                raise CheckpointUnreadable(
                    f"checkpoint {ckpt} could not be read ({unreadable or 'on another rank'}): not falling back "
                    "to an older state; run again when the storage answers"
                )  # fmt: skip
            if any_rank(problem is not None, device):
                if problem is not None:
                    log.warning("checkpoint %s cannot be resumed from: %s; trying an older one", ckpt, problem)
                problems.append(problem or f"{ckpt.name}: damaged on another rank")
                continue
            if problems and rank == 0:
                log.warning("resuming from %s, older than the %d damaged checkpoint(s) above", ckpt, len(problems))
            return load_checkpoint(engine, ckpt, cfg)
        if problems:
            raise DeterministicError(
                f"none of the {len(problems)} checkpoints of {cfg.output_location()} is whole (newest: {problems[0]}); "
                "nothing was resumed: move them away to start from step 0, or start anew with --fresh"
            )  # fmt: skip
    return Resumed()


def load_checkpoint(engine, ckpt: Path, cfg: RunConfig) -> Resumed:
    """Restore the engine (weights, optimiser) and this rank's RNG; return the rest for the caller to use."""
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
    device: torch.device | None = None,
) -> Path:
    """A complete checkpoint in a staging folder, this rank's files flushed to disk and listed in its manifest
    (the persistence commits it when every rank is done); ``metric``, the loss holding a learned metric, is
    exported beside the network in ``model.pt``."""
    staging, error = persistence.staging_dir(step), None
    try:
        _write_checkpoint(engine, staging, cfg, step, schedule, stream, metrics, baseline, metric, split_digest)
    except (OSError, RuntimeError) as e:  # torch.save on a full disk: RuntimeError "[enforce fail ...]"
        if isinstance(e, RuntimeError) and not WRITE_FAILED.search(str(e)):
            raise
        error = CheckpointUnwritable(_unwritable(staging, step, e))
    agree(error, device)  # rank 0 alone writes the client state and model.pt: the others must not wait
    return staging


def _unwritable(staging: Path, step: int, e: BaseException) -> str:
    free = "?"
    with contextlib.suppress(OSError):
        free = f"{shutil.disk_usage(staging.parent).free / 2**20:.0f} MiB"
    said = (str(e).strip().splitlines() or [""])[0][:200]
    return (
        f"the checkpoint of step {step} could not be written in {staging.parent} ({type(e).__name__}: {said}; "
        f"{free} free there): the last committed checkpoint stays; free some space (or lower "
        "train.keep_checkpoints) and rerun the same command to resume from it"
    )


def _write_checkpoint(engine, staging, cfg, step, schedule, stream, metrics, baseline, metric, split_digest):
    rank, world = rank_and_world()
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
            "config": resolved(cfg.to_dict()),  # every part's arguments, defaults included
            "config_resolved": 1,
            "split_digest": split_digest,
            "world": world,  # how many manifests make it whole
        }
        (staging / CLIENT_STATE).write_text(json.dumps(client))
        export_model(engine.module.net, staging / "model.pt", criterion=metric, image_size=cfg.data.image_size)
    _write_manifest(staging, rank)
