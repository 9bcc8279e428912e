"""Checkpoints: where they persist (:class:`Persistence`: a local folder, or Ray Train's storage) and what
one holds, so that a resumed run continues where the saved one stood.

A checkpoint folder holds DeepSpeed's state (every rank its partition; optimiser included), the client state
(``distpddm_state.json``: step, learning-rate schedule, metrics, the untrained baseline, the config), each
rank's RNG states (``rng_rank<r>.pt``) and data-stream position (``data_rank<r>.json``), and rank 0's exported
plain-PyTorch ``model.pt``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import RunConfig
from ..data.stream import StreamState
from ..dist import barrier, rank_and_world
from ..errors import ConfigError
from ..model import export_model
from .schedule import Schedule

CLIENT_STATE = "distpddm_state.json"
TAG = "checkpoint"


class Persistence:
    """Where checkpoints go and where a resumed run finds the last one."""

    @contextlib.contextmanager
    def latest(self) -> Iterator[Path | None]:
        yield None

    def staging_dir(self, step: int) -> Path:
        """An empty folder for this rank to write the step's checkpoint into."""
        raise NotImplementedError

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        raise NotImplementedError


class LocalPersistence(Persistence):
    """``<out>/checkpoints/step-<N>/``, written under a temporary name and renamed when every rank is done;
    ``latest`` (a one-line file) is replaced atomically after that, so it always names a complete checkpoint.
    """

    def __init__(self, out: Path, keep: int):
        self.root, self.keep = Path(out) / "checkpoints", keep

    @contextlib.contextmanager
    def latest(self) -> Iterator[Path | None]:
        pointer = self.root / "latest"
        if pointer.exists():
            path = self.root / pointer.read_text().strip()
            if path.is_dir():
                yield path
                return
        yield None

    def staging_dir(self, step: int) -> Path:
        staging = self.root / f".tmp-step-{step:08d}"  # shared by every rank
        if rank_and_world()[0] == 0 and staging.exists():  # left by a crash while writing
            shutil.rmtree(staging)
        barrier()
        staging.mkdir(parents=True, exist_ok=True)
        return staging

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is None:
            return
        rank, _ = rank_and_world()
        barrier()
        if rank == 0:
            final = self.root / checkpoint_dir.name.replace(".tmp-", "")
            if final.exists():
                shutil.rmtree(final)
            os.replace(checkpoint_dir, final)
            tmp = self.root / "latest.tmp"
            tmp.write_text(final.name)
            os.replace(tmp, self.root / "latest")
            done = sorted(p for p in self.root.glob("step-*") if p.is_dir())
            for old in done[: -self.keep] + list(self.root.glob(".tmp-step-*")):  # + leftovers of crashes
                shutil.rmtree(old, ignore_errors=True)
        barrier()


class RayPersistence(Persistence):
    """``ray.train.report(..., checkpoint=...)``: Ray merges every worker's directory and keeps the last N."""

    @contextlib.contextmanager
    def latest(self) -> Iterator[Path | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def staging_dir(self, step: int) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"distpddm-step{step}-"))

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device (stochastic depth, dropout)
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class Resumed:
    """What a checkpoint says about where the run stood (a fresh run: step 0, nothing else)."""

    step: int = 0
    schedule: Schedule | None = None  # the saved run's schedule
    baseline: dict = field(default_factory=dict)  # the untrained network's validation metrics
    data: StreamState | None = None  # this rank's stream position


def load_checkpoint(engine, ckpt: Path | None, cfg: RunConfig) -> Resumed:
    """Restore the engine (weights, optimiser) and this rank's RNG; return the rest for the caller to use."""
    if ckpt is None:
        return Resumed()
    rank, _ = rank_and_world()
    try:
        engine.load_checkpoint(str(ckpt), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
    except (KeyError, ValueError, RuntimeError) as e:  # every rank fails alike: a layout this run cannot take
        raise ConfigError(
            f"the checkpoint {ckpt} does not fit this run (model, loss or parameter groups differ, or it was "
            f"written by an older distpddm: {type(e).__name__}: {str(e)[:200]}); resume it with its own config, "
            "or start a new run (another name=)"
        ) from None
    state = json.loads((ckpt / CLIENT_STATE).read_text())
    if "schedule" in state:
        schedule = Schedule.from_dict(state["schedule"])
    else:  # written before the schedule was saved: the one its config gave
        from ..config import from_dict

        schedule = Schedule.from_config(from_dict(state["config"]))
    rng_file = ckpt / f"rng_rank{rank}.pt"
    if rng_file.exists():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    data_file = ckpt / f"data_rank{rank}.json"  # where this rank's stream stood: it continues from there
    if data_file.exists():
        data = StreamState.from_json(data_file.read_text())
    else:  # a rank the saved run did not have: all ranks start the epoch after the furthest one
        data = StreamState(layout={}, epoch_all=state.get("data_epoch", 0))
    return Resumed(state["step"], schedule, state.get("baseline", {}), data)


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
) -> Path:
    """A complete checkpoint in a staging folder (the persistence commits it when every rank is done);
    ``metric``, the loss holding a learned metric, is exported beside the network in ``model.pt``."""
    rank, _ = rank_and_world()
    staging = persistence.staging_dir(step)
    engine.save_checkpoint(str(staging), tag=TAG, client_state={"step": step})
    torch.save(_rng_state(), staging / f"rng_rank{rank}.pt")
    (staging / f"data_rank{rank}.json").write_text(stream.to_json())
    if rank == 0:
        client = {
            "step": step,
            "schedule": schedule.to_dict(),
            "data_epoch": stream.epoch_all,
            "metrics": metrics,
            "baseline": baseline,
            "config": cfg.to_dict(),
        }
        (staging / CLIENT_STATE).write_text(json.dumps(client))
        export_model(engine.module.net, staging / "model.pt", criterion=metric, image_size=cfg.data.image_size)
    return staging
