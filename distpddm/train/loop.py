"""The per-worker training function: one code path for a Ray Train worker, a torchrun process, or a single
process (``distpddm train --local``). Where they differ -- how checkpoints persist and how a run resumes --
a :class:`~.checkpoint.Persistence` decides; everything else is shared.

Per step: P x K batch -> embeddings (backbone in ``train.precision``, the rest fp32) -> :class:`PDDMLoss`
(gather with gradient, mine, double-header hinge, in fp32) -> DeepSpeed backward/step. The modules around it
hold one concern each: :mod:`.checkpoint` (state and resume), :mod:`.schedule` (parameter groups and the
learning rate), :mod:`.metrics_log` (what the user sees), :mod:`.faults` (failures every rank agrees on),
:func:`distpddm.evaluate.validate` (periodic Recall@K).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
import warnings

import torch
import torch.distributed as dist
from torch import nn

from ..config import RunConfig, deepspeed_config, from_dict
from ..data.stream import PKBatchDataset, resolve_shards
from ..data.transforms import normalize_batch, train_transform
from ..errors import DeterministicError, NonFiniteLossError
from ..evaluate import validate
from ..gather import rank_and_world
from ..loss import PDDMLoss
from ..model import create_model, export_model
from .checkpoint import Persistence, RayPersistence, load_checkpoint, save_checkpoint
from .faults import agree
from .metrics_log import MetricsLog, own_log_handler
from .outputs import RunOutput
from .schedule import Schedule, apply_config, param_groups, set_learning_rates
from .stop import StopWatch, write_preempted

log = logging.getLogger("distpddm.train")
ABORTED = "aborted.json"  # in the run folder: why the last attempt stopped for good

__all__ = ["ABORTED", "Trainable", "run_worker", "ray_train_loop", "NonFiniteLossError"]


class Trainable(nn.Module):
    """The network and the criterion in one module, so DeepSpeed optimises (and checkpoints) both."""

    def __init__(self, net: nn.Module, criterion: PDDMLoss):
        super().__init__()
        self.net, self.criterion = net, criterion


def build_engine(cfg: RunConfig, device: torch.device, world: int, deepspeed_base: dict | None = None):
    """(DeepSpeed engine, its optimiser, the parameter groups) for ``cfg``: every weight fp32, the backbone
    computing in ``train.precision``."""
    import deepspeed

    torch.manual_seed(cfg.train.seed)
    net = create_model(cfg.model, cfg.train.precision).to(device)
    criterion = PDDMLoss(cfg.model.embed_dim, **dataclasses.asdict(cfg.loss)).to(device)  # LossConfig mirrors it
    groups = param_groups(cfg, net, criterion)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas)  # decay set per group
    engine, optimizer, _, _ = deepspeed.initialize(
        model=Trainable(net, criterion),
        optimizer=optimizer,
        config=deepspeed_config(cfg, world, deepspeed_base),
        dist_init_required=world > 1 and not dist.is_initialized(),
    )
    return engine, optimizer, groups


def _max_over_ranks(value: int, device: torch.device) -> int:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(cfg: RunConfig) -> torch.device:
    if cfg.ray.use_gpu and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def _open_stream(cfg: RunConfig, world: int, rank: int):
    """The training split, checked before any collective so that every rank can agree on its errors."""
    shard_set = resolve_shards(cfg.data.train_shards)
    if rank == 0 and shard_set.chunk_size and shard_set.chunk_size < cfg.data.images_per_class:
        log.warning(
            "the shards were built with --chunk-size %d < data.images_per_class %d: a class's K images must meet "
            "in the batcher's buffer, and many are dropped; rebuild with --chunk-size %d",
            shard_set.chunk_size,
            cfg.data.images_per_class,
            cfg.data.images_per_class,
        )
    share, batch = (shard_set.samples or 0) // (world * max(1, cfg.data.loader_workers)), cfg.local_batch
    if rank == 0 and share < 4 * batch:
        log.warning(
            "each of the %d loader readers (ranks x data.loader_workers) streams ~%d samples per epoch, under 4 "
            "batches of %d: an epoch whose share holds fewer than data.classes_per_batch classes of "
            "data.images_per_class images stops the run (CannotBatchError); use fewer readers or more data",
            world * max(1, cfg.data.loader_workers),
            share,
            batch,
        )
    return shard_set


def run_worker(cfg: RunConfig, persistence: Persistence, out: RunOutput, deepspeed_base: dict | None = None) -> dict:
    """Train until ``train.steps``, resuming from the latest checkpoint when there is one. Returns the last
    metrics (on every rank). Rank 0 writes the run's files to ``out`` (copied up at each checkpoint and at
    the end when the storage is remote). A :class:`DeterministicError` is raised on every rank together. A stop
    request (:mod:`.stop`) ends it early after a checkpoint at that step, with ``"preempted": True``."""
    # DeepSpeed 0.19's ZeRO all-gather calls a torch.distributed API that torch 2.14 deprecates: once per step.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor` is deprecated", category=FutureWarning)
    rank, world = rank_and_world()
    # The loader workers read the rank from the environment.
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    device = _device(cfg)
    shard_set, error = None, None
    try:
        shard_set = _open_stream(cfg, world, rank)
    except (DeterministicError, ValueError, FileNotFoundError) as e:  # missing or damaged shards on this node
        error = e if isinstance(e, DeterministicError) else DeterministicError(str(e))
    agree(error, device)

    engine, optimizer, groups = build_engine(cfg, device, world, deepspeed_base)
    with persistence.latest() as ckpt:
        resumed = load_checkpoint(engine, ckpt, cfg)
    apply_config(optimizer, groups, cfg)
    start = resumed.step
    schedule = resumed.schedule.resumed(cfg, start) if resumed.schedule else Schedule.from_config(cfg)
    if rank == 0 and ckpt is not None:
        log.info("resumed from %s at step %d", ckpt, start)
        if schedule is not resumed.schedule:
            log.info(
                "schedule settings changed: learning rate recomputed from the config at step %d (multiplier %.4g, "
                "cosine to %.4g at step %d)",
                start,
                schedule(start),
                schedule.floor,
                schedule.total,
            )

    if start >= cfg.train.steps:  # a finished run asked again: report where it stands
        if rank == 0:
            log.info("already at step %d of %d; raise train.steps to train further", start, cfg.train.steps)
        final = validate(cfg, engine.module.net, device) if cfg.data.val_shards else {}
        return resumed.baseline | final | {"step": start}

    dataset = PKBatchDataset(
        shard_set,
        cfg.data.classes_per_batch,
        cfg.data.images_per_class,
        image_size=cfg.data.image_size,
        buffer_images=cfg.data.buffer_images,
        max_skip_rate=cfg.data.max_skip_rate,
        seed=cfg.train.seed,
        transform=train_transform(cfg.data.image_size, crop_scale=cfg.data.crop_scale, hflip=cfg.data.hflip),
        start=resumed.data,
    )
    stream_state = dataset.start_state(world, max(1, cfg.data.loader_workers))  # advanced by every batch taken
    loader = iter(
        torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=cfg.data.loader_workers,
            persistent_workers=cfg.data.loader_workers > 0,
        )
    )
    if rank == 0:
        out.pull("metrics.jsonl")  # a resumed run appends to the lines of the attempts before it
    metrics_log = MetricsLog(out.local, rank == 0, cfg.train.steps, start, cfg.train.progress)
    net, criterion = engine.module.net, engine.module.criterion
    lr_of = {g["name"]: g for g in optimizer.param_groups}
    last: dict = {}
    baseline: dict = resumed.baseline  # the untrained network's Recall@K ("val0_*"), beside the current one
    nonfinite = skipped_steps = 0
    step = start
    watch, stop = StopWatch(out, rank), False  # a stop request (preemption): checkpoint at once, then return
    try:
        if cfg.data.val_shards and cfg.train.val_at_start and start == 0:
            initial = validate(cfg, net, device)
            metrics_log.write(0, initial)
            baseline = {k.replace("val_", "val0_"): v for k, v in initial.items()}
        while step < cfg.train.steps:
            timed = (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps
            t0 = time.perf_counter()
            batch, error = None, None
            try:
                batch = next(loader)
            except DeterministicError as e:  # bad data past the threshold, a share that forms no batch
                error = e
            agree(error, device)
            images, labels, _, where = batch
            stream_state.advance(where)  # spent even if the step is skipped
            images = normalize_batch(images.to(device, non_blocking=True))
            labels = labels.to(device)
            t_data = time.perf_counter()
            emb = net(images)
            if timed:
                _sync(device)
            t_fwd = time.perf_counter()
            criterion.timed = timed
            criterion.set_step(step + 1)  # loss.metric_grad_after and the memory warm-up count steps (resumes too)
            loss, stats = criterion(emb, labels)
            finite = torch.isfinite(loss.detach()).float()
            if world > 1:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            t_loss = time.perf_counter()
            if finite.item() < 1:  # every rank skips together, or the collectives would hang
                nonfinite += 1
                skipped_steps += 1
                if rank == 0:
                    log.warning("step %d: non-finite loss, step skipped (%d in a row)", step + 1, nonfinite)
                if nonfinite >= cfg.train.nan_abort_after:
                    raise NonFiniteLossError(
                        f"{nonfinite} consecutive non-finite losses at step {step + 1}: lower optim.lr, check the "
                        "data, or raise train.nan_abort_after"
                    )
                continue
            nonfinite = 0
            set_learning_rates(optimizer, schedule(step))
            engine.backward(loss)
            engine.step()
            if timed:
                _sync(device)
            t_step = time.perf_counter()
            step += 1
            metrics_log.step()
            fresh: dict = {}  # measured at this step: the only figures logged under its number
            if timed:
                total = t_step - t0
                gather = criterion.timings.get("gather", 0.0)
                fresh = {
                    "loss": float(loss.detach()),
                    **stats.as_dict(),
                    "lr": lr_of.get("backbone/decay", optimizer.param_groups[0])["lr"],
                    "head_lr": lr_of.get("heads/decay", optimizer.param_groups[-1])["lr"],
                    "images_per_s": world * len(labels) / total,
                    "skipped_steps": float(skipped_steps),
                    "data_epoch": float(where.epoch),
                    "data_used": where.used / max(1, where.read),  # of this reader's samples so far this epoch
                    "time_data": t_data - t0,
                    "time_forward": t_fwd - t_data,
                    "time_comm": gather,
                    "time_mining_loss": t_loss - t_fwd - gather,
                    "time_backward_step": t_step - t_loss,
                    "time_step": total,
                }
            val_due = cfg.data.val_shards and (
                (cfg.train.val_every and step % cfg.train.val_every == 0) or step == cfg.train.steps
            )
            val_error = None
            if val_due:
                try:
                    fresh |= validate(cfg, net, device)
                except DeterministicError as e:  # raised on every rank; the step's checkpoint is saved first
                    val_error = e
            last = last | fresh  # the latest of each figure: what checkpoints and Ray reports carry
            ckpt_due = step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps
            stop = step < cfg.train.steps and watch.agreed(device)
            if fresh:
                metrics_log.write(step, fresh)
            if ckpt_due or stop:
                stream_state.epoch_all = _max_over_ranks(stream_state.epoch, device)
                staging = save_checkpoint(engine, persistence, cfg, step, schedule, stream_state, last, baseline)
                persistence.report({"step": step, **baseline, **last}, staging)
                if rank == 0:
                    metrics_log.flush()
                    out.push()
            elif timed:  # metrics only (Ray tracks them; the local run has its JSONL)
                persistence.report({"step": step, **baseline, **last}, None)
            if val_error is not None:
                raise val_error
            if stop:
                break
        if rank == 0 and stop:  # the driver reads it: resumable, not finished
            write_preempted(out, step)
            log.warning("stopped on request at step %d (checkpoint saved); rerun the same command to resume", step)
        elif rank == 0:
            export_model(net, out.local / "model.pt", criterion=criterion, image_size=cfg.data.image_size)
    finally:
        metrics_log.close()
        if rank == 0:
            out.push()
        out.close()
    return baseline | last | {"step": step} | ({"preempted": True} if stop else {})


def ray_train_loop(loop_config: dict) -> None:
    """Entry point of every Ray Train worker (``TorchTrainer(train_loop_per_worker=...)``).

    A deterministic failure, which every rank meets together, is written to the run folder (``ABORTED``) and
    the workers return: the driver raises it, and Ray spends no retry on what a retry cannot fix."""
    own_log_handler()
    import ray

    rank, world = rank_and_world()  # where each rank runs, for a multi-node cluster's logs
    log.info("rank %d of %d on node %s (host %s, gloo interface %s)", rank, world, ray.util.get_node_ip_address(),
             socket.gethostname(), os.environ.get("GLOO_SOCKET_IFNAME", "default"))  # fmt: skip
    if rank == 0:  # an earlier attempt's verdict does not hold for this one
        stale = RunOutput(loop_config["output"])
        stale.remove(ABORTED)
        stale.close()
    try:
        run_worker(
            from_dict(loop_config["config"]),
            RayPersistence(),
            RunOutput(loop_config["output"]),
            loop_config.get("deepspeed"),  # read by the driver: the file may sit in its own job folder
        )
    except DeterministicError as e:
        log.error("the run stops: %s", e)
        if rank_and_world()[0] == 0:
            out = RunOutput(loop_config["output"])
            out.write_text(ABORTED, json.dumps({"error": type(e).__name__, "message": str(e)}))
            out.close()
