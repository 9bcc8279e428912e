"""Start a training run: on Ray (a local cluster, or the one RAY_ADDRESS / ``address`` names) or in-process.

The output folder is ``<ray.storage_path>/<name>/`` (local, shared, or remote through fsspec; see
:mod:`.outputs`): the resolved config, ``metrics.jsonl``, TensorBoard curves, checkpoints and the exported
``model.pt``. Rerunning the same command resumes from the last
checkpoint there and continues the schedule. A stop request (SIGUSR1 / SIGTERM; see :mod:`.stop`) saves a
checkpoint at the current step and raises :class:`~.stop.Preempted`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from ..config import RunConfig, save_config
from ..criterion import resolved
from ..dist import agree, init_device
from ..errors import ClusterResourcesError, DeterministicError, RunAborted
from . import stop
from .checkpoint import LocalPersistence
from .outputs import RunOutput, is_remote, run_location
from .runfolder import RunLock, check_resume
from .trainer import ABORTED, ray_train_loop, run_worker

log = logging.getLogger("distpddm.train")


def free_port() -> int:
    """A TCP port free on this host now (for a single-host process group)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split_digest(cfg: RunConfig) -> str | None:
    from ..data.stream import resolve_shards

    try:
        return resolve_shards(cfg.data.train_shards).digest
    except (OSError, ValueError, KeyError):  # the workers report an unreadable split, each in its own words
        return None


def claim(cfg: RunConfig, out: RunOutput, *, force: bool = False) -> RunLock:
    """The run folder, locked for this run, checked to hold no other run's checkpoints (unless ``force``),
    then given this run's config and cleared of an earlier attempt's stop request and outcome. Release the
    returned lock when the run ends."""
    lock = RunLock(out.location).__enter__()
    try:
        check_resume(cfg, _split_digest(cfg), force=force)
    except BaseException:
        lock.__exit__(None, None, None)
        raise
    # after the check: it describes the checkpoints beside it, every part's arguments spelled out
    save_config(resolved(cfg.to_dict()), out.local / "config.yaml")
    out.remove(ABORTED)  # an earlier attempt's; this one writes its own if it must stop
    stop.clear(out)
    return lock


def train_local(cfg: RunConfig, *, force: bool = False) -> dict:
    """One process (or every process of a torchrun launch): no Ray, the same worker code. SIGUSR1 / SIGTERM
    to any process stop the run at the next step with a checkpoint (:class:`~.stop.Preempted`). Rank 0 holds
    the run folder (:func:`claim`); a refusal there stops every rank."""
    if is_remote(cfg.ray.storage_path):
        raise ValueError(
            f"ray.storage_path={cfg.ray.storage_path!r} is remote: --local keeps checkpoints in a local or shared "
            "folder. Train through Ray for remote storage, or give a local path."
        )
    out = RunOutput(cfg.output_location())
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:  # plain single process: a world of one for DeepSpeed
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                              LOCAL_RANK="0")  # fmt: skip
        backend = "nccl" if cfg.ray.use_gpu else "gloo"
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    lock, error = None, None
    if dist.get_rank() == 0:
        try:
            lock = claim(cfg, out, force=force)
        except DeterministicError as e:
            error = e
    previous = stop.install()
    try:
        agree(error, init_device(cfg.ray.use_gpu))
        metrics = run_worker(cfg, LocalPersistence(out.local, cfg.train.keep_checkpoints), out)
    finally:
        stop.restore(previous)
        dist.destroy_process_group()
        if lock is not None:
            lock.__exit__(None, None, None)
    if metrics.pop("preempted", False):  # every rank alike
        raise stop.Preempted(metrics["step"], out.location)
    return metrics


def train_ray(cfg: RunConfig, address: str | None = None, *, force: bool = False):
    """Ray Train's TorchTrainer with ``ray.num_workers`` workers placed by ``ray.placement_strategy``; restarts
    failed workers from the last checkpoint up to ``ray.max_failures`` times. A deterministic failure (bad data,
    non-finite losses, a config that cannot work) spends no retry: it raises :class:`RunAborted` with the
    workers' message. A cluster that cannot host the workers for ``ray.resources_timeout_s`` (a lost node not
    back) raises :class:`ClusterResourcesError`. SIGUSR1 / SIGTERM to this process write the run folder's
    stop request: the workers checkpoint and return, and this raises :class:`~.stop.Preempted`."""
    import ray

    from ..ray_cluster import ResourceWatch, connect_ray, fit, torch_trainer

    storage = cfg.ray.storage_path
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    out = RunOutput(run_location(storage, cfg.name))
    lock = claim(cfg, out, force=force)  # the driver holds the run folder while the run lives
    try:
        out.push()
        started_here = connect_ray(address, cfg.ray.num_workers * cfg.ray.cpus_per_worker)
    except BaseException:
        lock.__exit__(None, None, None)
        raise
    loop_config = {"config": cfg.to_dict(), "output": out.location,
                   "deepspeed": json.loads(Path(cfg.train.deepspeed).read_text())}  # fmt: skip
    trainer = torch_trainer(
        ray_train_loop, loop_config, name=cfg.name, storage_path=storage, num_workers=cfg.ray.num_workers,
        use_gpu=cfg.ray.use_gpu, cpus_per_worker=cfg.ray.cpus_per_worker,
        placement_strategy=cfg.ray.placement_strategy, max_failures=cfg.ray.max_failures,
        keep_checkpoints=cfg.train.keep_checkpoints,
    )  # fmt: skip
    watch = ResourceWatch(cfg.ray)
    # After ray.init, which sets its own SIGTERM handler (exit at once).
    previous = stop.install(lambda what: _request_stop(out, what))  # also for a signal while Ray started
    try:
        watch.wait_until_fit()
        with watch:
            try:
                result = fit(trainer)
            except Exception:
                if watch.reason is None:
                    raise
        if watch.reason is not None:
            raise ClusterResourcesError(watch.reason)
        aborted = out.read_text(ABORTED)
        preempted = stop.read_preempted(out)
    finally:
        stop.restore(previous)
        out.close()
        if started_here:  # leave no local cluster (or a recovered run's leftovers) waiting at exit
            ray.shutdown()
        lock.__exit__(None, None, None)
    if aborted:
        why = json.loads(aborted)
        raise RunAborted(f"{why['error']}: {why['message']}")
    if preempted is not None:
        raise stop.Preempted(preempted, out.location)
    return result


def _request_stop(out: RunOutput, what: str) -> None:
    """The driver's action on a stop request (``what``: the signal), run by :mod:`.stop`'s watcher thread, not
    in the signal handler: the workers (elsewhere) see the request in the run folder."""
    log.warning("%s: the workers save a checkpoint at their next step, then stop", what)
    out.write_text(stop.STOP_REQUEST, what)
