"""The per-worker trainer, one code path for a Ray Train worker, a torchrun process or a single process
(``distpddm train --local``); where they differ -- how checkpoints persist and how a run resumes -- a
:class:`~.checkpoint.Persistence` decides.

A :class:`Trainer` is built once (engine, data, criterion, checkpointer, validator), resumes from the latest
checkpoint, then :meth:`Trainer.train` runs :meth:`Trainer.train_step` until ``train.steps``: P x K batch ->
embeddings (backbone in ``train.precision``, the rest fp32) -> the criterion (gather with gradient, mine,
loss, in fp32) -> DeepSpeed backward and step.

Every rank must call the same collectives in the same order, or the job hangs. They are named where they
are called: in :meth:`Trainer.train_step` (per step) and :meth:`Trainer.after_step` (validation, the stop
request, checkpoints); nothing else in the loop communicates.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import warnings

import torch
from torch import nn

from ..config import RunConfig, deepspeed_config, from_dict
from ..criterion import build_loss, inner_loss
from ..data.stream import PKBatchDataset, resolve_shards
from ..data.transforms import normalize_batch, train_transform
from ..dist import agree, all_finite, any_rank, device_time, init_device, max_over_ranks, rank_and_world
from ..errors import DeterministicError, NonFiniteLossError, NonFiniteWeightsError, StorageUnavailable
from ..model import create_model, export_model
from ..validation import Validator
from ..wrappers import CrossDevice
from .checkpoint import Persistence, RayPersistence, resume_latest, save_checkpoint
from .health import CollapseWatch
from .metrics_log import MetricsLog, own_log_handler
from .outputs import RunOutput
from .schedule import Schedule, apply_config, param_groups, set_learning_rates
from .stop import StopWatch, write_preempted

log = logging.getLogger("distpddm.train")
ABORTED = "aborted.json"  # in the run folder: why the last attempt stopped for good

__all__ = ["ABORTED", "Trainable", "Trainer", "build_engine", "run_worker", "ray_train_loop"]


class Trainable(nn.Module):
    """The network and the loss (whatever holds learned parameters: the PDDM unit) in one module, so DeepSpeed
    optimises and checkpoints both."""

    def __init__(self, net: nn.Module, criterion: nn.Module):
        super().__init__()
        self.net, self.criterion = net, criterion


def build_model(cfg: RunConfig, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(the embedding network, the loss with its wrappers), seeded: every weight fp32, the backbone computing
    in ``train.precision``. No collective: a rank that cannot build them says so before any is called."""
    torch.manual_seed(cfg.train.seed)
    net = create_model(cfg.model, cfg.train.precision).to(device)
    loss = build_loss(cfg).to(device)  # memory wrapper included; its inner loss holds the parameters
    return net, loss


def build_engine(cfg: RunConfig, device: torch.device, world: int, deepspeed_base: dict | None = None, built=None):
    """(DeepSpeed engine, its optimiser, the parameter groups, the loss with its wrappers) for ``cfg``, around
    ``built`` (:func:`build_model`'s pair, built here when not given). Collective: DeepSpeed's set-up."""
    import deepspeed

    net, loss = built if built is not None else build_model(cfg, device)
    groups = param_groups(cfg, net, inner_loss(loss))
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas)  # decay set per group
    engine, optimizer, _, _ = deepspeed.initialize(
        model=Trainable(net, inner_loss(loss)),
        optimizer=optimizer,
        config=deepspeed_config(cfg, world, deepspeed_base),
        dist_init_required=world > 1 and not torch.distributed.is_initialized(),
    )
    return engine, optimizer, groups, loss


class Trainer:
    """One rank's run: built once, then :meth:`train`. Rank 0 writes the run's files to ``out`` (copied up at
    each checkpoint and at the end when the storage is remote). A stop request (:mod:`.stop`) ends the run
    after a checkpoint at that step; a :class:`DeterministicError` is raised on every rank together."""

    def __init__(self, cfg: RunConfig, persistence: Persistence, out: RunOutput, deepspeed_base: dict | None = None):
        # DeepSpeed 0.19's ZeRO all-gather calls a torch.distributed API that torch 2.14 deprecates: once per step.
        warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor` is deprecated", category=FutureWarning)
        self.cfg, self.persistence, self.out = cfg, persistence, out
        self.rank, self.world = rank_and_world()
        os.environ.setdefault("RANK", str(self.rank))  # the loader workers read the rank from the environment
        os.environ.setdefault("WORLD_SIZE", str(self.world))
        self.device = init_device(cfg.ray.use_gpu)
        shard_set = self._open_split()  # collective: every rank agrees on a split one of them cannot read
        built = self._build_model()  # collective: ... and on a model one of them cannot build
        self.engine, self.optimizer, groups, loss = build_engine(cfg, self.device, self.world, deepspeed_base, built)
        self.net, self.loss = self.engine.module.net, self.engine.module.criterion
        self.criterion = CrossDevice(loss)
        self.validator = Validator(cfg, self.device)
        alpha = getattr(self.loss, "alpha", None)  # a loss with a learned metric's margin (PDDMLoss)
        patience = max(100, 5 * cfg.train.log_every)
        self.collapse = CollapseWatch(alpha, patience) if self.rank == 0 and alpha else None
        self.resume(groups)
        self.watch, self.stopped = StopWatch(out, self.rank), False
        self.last: dict = {}  # the latest of each figure: what checkpoints and Ray reports carry
        self.nonfinite = self.skipped_steps = 0
        self.loader = self.stream_state = self.log = None
        if self.step < cfg.train.steps:
            self._open_stream(shard_set)

    # ------------------------------------------------------------------------------------------ set-up

    def _open_split(self):
        """The training split, checked before any collective so that every rank can agree on its errors."""
        shard_set, error = None, None
        try:
            shard_set = resolve_shards(self.cfg.data.train_shards)
            self.split_digest = shard_set.digest
            if self.rank == 0:
                _warn_about_split(self.cfg, shard_set, self.world)
        except (DeterministicError, ValueError, FileNotFoundError) as e:  # missing or damaged shards on this node
            error = e if isinstance(e, DeterministicError) else DeterministicError(str(e))
        agree(error, self.device)
        return shard_set

    def _build_model(self):
        """The network and the loss, or every rank's stop: weights missing on one node (a per-machine Hugging
        Face cache, a file not on shared storage) must not leave the others waiting in DeepSpeed's set-up."""
        built, error = None, None
        try:
            built = build_model(self.cfg, self.device)
        except (ValueError, FileNotFoundError, OSError) as e:
            error = DeterministicError(f"the model cannot be built on this node: {e}")
        agree(error, self.device)
        return built

    def resume(self, groups: list[dict]) -> None:
        """The engine, RNG and stream position from the latest checkpoint (if any); base rates, weight decay and
        betas from the config; the schedule continued, or recomputed where its settings changed."""
        cfg = self.cfg
        resumed = resume_latest(self.engine, self.persistence, cfg, self.device)
        ckpt = resumed.source
        apply_config(self.optimizer, groups, cfg)
        self.step, self.resumed_data, self.baseline = resumed.step, resumed.data, resumed.baseline
        self.schedule = resumed.schedule.resumed(cfg, self.step) if resumed.schedule else Schedule.from_config(cfg)
        if self.rank == 0 and ckpt is not None:
            log.info("resumed from %s at step %d", ckpt, self.step)
            if self.schedule is not resumed.schedule:
                log.info(
                    "schedule settings changed: learning rate recomputed from the config at step %d (multiplier "
                    "%.4g, cosine to %.4g at step %d)",
                    self.step,
                    self.schedule(self.step),
                    self.schedule.floor,
                    self.schedule.total,
                )

    def _open_stream(self, shard_set) -> None:
        d = self.cfg.data
        common = {
            "image_size": d.image_size,
            "max_skip_rate": d.max_skip_rate,
            "seed": self.cfg.train.seed,
            "transform": train_transform(d.image_size, crop_scale=d.crop_scale, hflip=d.hflip),
            "start": self.resumed_data,
        }
        dataset, error = None, None
        try:
            if shard_set.foreign:  # pre-shuffled, indexed in place: class-aware range reads (distpddm.data.foreign)
                from ..data.foreign import ForeignPKDataset

                dataset = ForeignPKDataset(shard_set, d.classes_per_batch, d.images_per_class, **common)
            else:
                dataset = PKBatchDataset(
                    shard_set, d.classes_per_batch, d.images_per_class, buffer_images=d.buffer_images, **common
                )
        except Exception as e:  # noqa: BLE001 -- before any collective: a foreign split's indexes are read here
            error = DeterministicError(f"the training split cannot be read on this node: {type(e).__name__}: {e}")
        agree(error, self.device)
        self.stream_state = dataset.start_state(self.world, max(1, d.loader_workers))  # advanced by every batch
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, num_workers=d.loader_workers, persistent_workers=d.loader_workers > 0
        )
        self.loader = iter(loader)
        if self.rank == 0:
            self.out.pull("metrics.jsonl")  # a resumed run appends to the lines of the attempts before it
        self.log = MetricsLog(self.out.local, self.rank == 0, self.cfg.train.steps, self.step, self.cfg.train.progress)
        self.lr_of = {g["name"]: g for g in self.optimizer.param_groups}

    # ------------------------------------------------------------------------------------------ the loop

    def train(self) -> dict:
        """Train until ``train.steps`` (or a stop request); returns the last metrics, on every rank."""
        steps = self.cfg.train.steps
        if self.step >= steps:  # a finished run asked again: report where it stands
            if self.rank == 0:
                log.info("already at step %d of %d; raise train.steps to train further", self.step, steps)
            final = self.validator(self.net) if self.validator.enabled else {}
            self.out.close()
            return self.baseline | final | {"step": self.step}
        try:
            if self.validator.at_start(self.step):
                self.validate_at_start()
            while self.step < self.cfg.train.steps and not self.stopped:
                metrics = self.train_step()
                if metrics is not None:
                    self.stopped = self.after_step(metrics)
            self.finish()
        finally:
            self.close()
        return self.baseline | self.last | {"step": self.step} | ({"preempted": True} if self.stopped else {})

    def train_step(self) -> dict | None:
        """One optimiser step: the step's metrics when it is a logging step, else ``{}``; None when the loss was
        not finite (every rank skips the step together). Collectives, on every rank, in this order:
        1. :func:`~distpddm.dist.agree` on the batch (a data error on any rank stops them all);
        2. the criterion: the gather of sizes, embeddings and labels, the reducer's count all-reduce (and a
           batch miner's all-gather);
        3. :func:`~distpddm.dist.all_finite` on the loss;
        4. DeepSpeed's backward and step (the gradient reduction)."""
        timed = self.step + 1 == self.cfg.train.steps or (self.step + 1) % self.cfg.train.log_every == 0
        t0 = time.perf_counter()
        images, labels, where = self._next_batch()  # 1
        t_data = time.perf_counter()
        emb = self.net(images)
        t_fwd = device_time(self.device) if timed else time.perf_counter()
        self.criterion.timed = timed
        self.criterion.set_step(self.step + 1)  # what metric_grad_after and the memory's warm-up count
        loss, stats = self.criterion(emb, labels)  # 2
        finite = all_finite(loss)  # 3
        t_loss = time.perf_counter()
        if not finite:
            self._skip_step()
            return None
        self.nonfinite = 0
        set_learning_rates(self.optimizer, self.schedule(self.step))
        self.engine.backward(loss)  # 4
        self.engine.step()
        t_step = device_time(self.device) if timed else time.perf_counter()
        self.step += 1
        self.log.step()
        if not timed:
            return {}
        times = {"data": t_data - t0, "forward": t_fwd - t_data, "loss": t_loss - t_fwd, "step": t_step - t_loss}
        return self._step_metrics(loss, stats, len(labels), where, times)

    def after_step(self, metrics: dict) -> bool:
        """Validation when due, the stop request, and a checkpoint when due or stopping; whether to stop.
        Collectives, on every rank, in this order: validation (:class:`~distpddm.validation.Validator`), the
        stop watch's any-rank flag, then a checkpoint's max-over-ranks epoch and its barriers."""
        step, val_error, fresh = self.step, None, dict(metrics)
        if self.validator.should_validate(step):
            try:
                fresh |= self.validator(self.net)
            except DeterministicError as e:  # raised on every rank; the step's checkpoint is saved first
                val_error = e
        self.last |= fresh
        stop = step < self.cfg.train.steps and self.watch.agreed(self.device)
        if fresh:
            self.log.write(step, fresh)
        if self.should_checkpoint(step) or stop:
            self.save_checkpoint()
        elif metrics:  # metrics only (Ray tracks them; the local run has its JSONL)
            self.persistence.report({"step": step, **self.baseline, **self.last}, None)
        if val_error is not None:
            raise val_error
        return stop

    def should_checkpoint(self, step: int) -> bool:
        return step % self.cfg.train.checkpoint_every == 0 or step == self.cfg.train.steps

    def validate_at_start(self) -> None:
        """The untrained network's figures: logged at step 0 and kept beside the current ones as ``val0_*``."""
        initial = self.validator(self.net)
        self.log.write(0, initial)
        self.baseline = {k.replace("val_", "val0_"): v for k, v in initial.items()}

    def _next_batch(self):
        batch, error = None, None
        try:
            batch = next(self.loader)
        except (DeterministicError, StorageUnavailable) as e:  # bad data or an outage past the threshold, ...
            error = e
        agree(error, self.device)
        images, labels, _, where = batch
        self.stream_state.advance(where)  # spent even if the step is skipped
        return normalize_batch(images.to(self.device, non_blocking=True)), labels.to(self.device), where

    def _skip_step(self) -> None:
        self.nonfinite += 1
        self.skipped_steps += 1
        if self.rank == 0:
            log.warning("step %d: non-finite loss, step skipped (%d in a row)", self.step + 1, self.nonfinite)
        if self.nonfinite >= self.cfg.train.nan_abort_after:
            raise NonFiniteLossError(
                f"{self.nonfinite} consecutive non-finite losses at step {self.step + 1}: lower optim.lr, check the "
                "data, or raise train.nan_abort_after"
            )

    def _step_metrics(self, loss, stats: dict, batch: int, where, times: dict) -> dict:
        total = sum(times.values())
        gather = self.criterion.timings.get("gather", 0.0)
        stats = {k: float(v) for k, v in stats.items()}
        return {
            "loss": float(loss.detach()),
            **stats,
            **(self.collapse(self.step, stats) if self.collapse is not None else {}),
            "lr": self.lr_of.get("backbone/decay", self.optimizer.param_groups[0])["lr"],
            "head_lr": self.lr_of.get("heads/decay", self.optimizer.param_groups[-1])["lr"],
            "images_per_s": self.world * batch / total,
            "skipped_steps": float(self.skipped_steps),
            "data_epoch": float(where.epoch),
            "data_used": where.used / max(1, where.read),  # of this reader's samples so far this epoch
            "time_data": times["data"],
            "time_forward": times["forward"],
            "time_comm": gather,
            "time_mining_loss": times["loss"] - gather,
            "time_backward_step": times["step"],
            "time_step": total,
        }

    # ---------------------------------------------------------------------------- checkpoints and the end

    def save_checkpoint(self) -> None:
        """A checkpoint at the current step, reported to the persistence (collective: every rank checks its
        weights are finite and writes its part; the furthest data epoch of any rank goes with it)."""
        self.check_weights()
        self.stream_state.epoch_all = max_over_ranks(self.stream_state.epoch, self.device)
        staging = save_checkpoint(
            self.engine, self.persistence, self.cfg, self.step, self.schedule, self.stream_state, self.last,
            self.baseline, metric=self.exported_metric(), split_digest=self.split_digest, device=self.device,
        )  # fmt: skip
        self.persistence.report({"step": self.step, **self.baseline, **self.last}, staging)
        if self.rank == 0:
            self.log.flush()
            self.out.push()

    def check_weights(self) -> None:
        """Collective: stop every rank before a checkpoint or export when any weight is not finite (a finite
        loss with non-finite gradients), so that no NaN weights become the checkpoint a resume takes."""
        finite = all(bool(torch.isfinite(p).all()) for p in self.engine.module.parameters())
        if any_rank(not finite, self.device):
            raise NonFiniteWeightsError(
                f"weights are not finite at step {self.step} (non-finite gradients from a finite loss): no "
                "checkpoint is written and the last one stays; lower optim.lr or check the data"
            )

    def exported_metric(self) -> nn.Module | None:
        """The loss whose learned metric goes beside the network in ``model.pt`` (PDDM, Mahalanobis)."""
        return self.loss if hasattr(self.loss, "scorer") else None

    def export(self) -> None:
        """Rank 0: the plain-PyTorch ``model.pt`` of the run folder."""
        if self.rank == 0:
            export_model(
                self.net, self.out.local / "model.pt", criterion=self.exported_metric(),
                image_size=self.cfg.data.image_size,
            )  # fmt: skip

    def finish(self) -> None:
        """After the last step: the export, or (stopped on request) the note the driver reads."""
        if self.stopped:
            if self.rank == 0:  # resumable, not finished
                write_preempted(self.out, self.step)
                log.warning("stopped on request at step %d (checkpoint saved); rerun the command to resume", self.step)
        else:
            self.export()  # the last step's checkpoint checked the weights

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.rank == 0:
            self.out.push()
        self.out.close()


def _warn_about_split(cfg: RunConfig, shard_set, world: int) -> None:
    chunk, K = shard_set.chunk_size, cfg.data.images_per_class
    if chunk and chunk < K:
        log.warning(
            "the shards were built with --chunk-size %d < data.images_per_class %d: a class's K images must meet "
            "in the batcher's buffer, and many are dropped; rebuild with --chunk-size %d",
            chunk, K, 2 * K,
        )  # fmt: skip
    elif chunk and len(shard_set.classes or ()) > 4 * cfg.data.classes_per_batch and not 2 * K <= chunk < 3 * K:
        why = (
            "a batch takes a class's waiting chunk (nearly) whole, so most images meet the same positives every epoch"
            if chunk < 2 * K
            else "ready classes holding a chunk each overflow the batcher's pool (data.buffer_images): it drops samples"
        )
        log.warning(
            "the shards were built with --chunk-size %d, data.images_per_class is %d: with many classes %s; rebuild "
            "with --chunk-size %d (docs/benchmarks.md, \"Positive pairs\")",
            chunk, K, why, 2 * K,
        )  # fmt: skip
    readers = world * max(1, cfg.data.loader_workers)
    share = (shard_set.samples or 0) // readers
    if share < 4 * cfg.local_batch:
        log.warning(
            "each of the %d loader readers (ranks x data.loader_workers) streams ~%d samples per epoch, under 4 "
            "batches of %d: an epoch whose share holds fewer than data.classes_per_batch classes of "
            "data.images_per_class images stops the run (CannotBatchError); use fewer readers or more data",
            readers,
            share,
            cfg.local_batch,
        )


def run_worker(cfg: RunConfig, persistence: Persistence, out: RunOutput, deepspeed_base: dict | None = None) -> dict:
    """Build a :class:`Trainer` and train; returns the last metrics (on every rank)."""
    return Trainer(cfg, persistence, out, deepspeed_base).train()


def ray_train_loop(loop_config: dict) -> None:
    """Entry point of every Ray Train worker. A deterministic failure, which every rank meets together, is
    written to the run folder (``ABORTED``) and the workers return: the driver raises it, and Ray spends no
    retry on what a retry cannot fix."""
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
            RayPersistence(loop_config["output"]),
            RunOutput(loop_config["output"]),
            loop_config.get("deepspeed"),  # read by the driver: the file may sit in its own job folder
        )
    except DeterministicError as e:
        log.error("the run stops: %s", e)
        if rank == 0:
            out = RunOutput(loop_config["output"])
            out.write_text(ABORTED, json.dumps({"error": type(e).__name__, "message": str(e)}))
            out.close()
