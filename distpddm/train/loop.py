"""The per-worker training function: one code path for a Ray Train worker, a torchrun process, or a single
process (``distpddm train --local``). Where they differ -- how checkpoints persist and how a run resumes --
a :class:`Persistence` object decides; everything else is shared.

Per step: P x K batch -> embeddings -> gather (with gradient) -> mine + PDDM loss -> DeepSpeed backward/step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..config import RunConfig, deepspeed_config, from_dict
from ..data.stream import EvalDataset, PKBatchDataset, StreamState, resolve_shards
from ..data.transforms import normalize_batch, train_transform
from ..evaluate import recall_at_k
from ..gather import gather_batch, rank_and_world
from ..loss import PDDMLoss
from ..model import create_model, export_model
from .outputs import RunOutput

log = logging.getLogger("distpddm.train")
CLIENT_STATE = "distpddm_state.json"
TAG = "checkpoint"


class NonFiniteLossError(RuntimeError):
    pass


class Trainable(nn.Module):
    """The network and the criterion in one module, so DeepSpeed optimises (and checkpoints) both."""

    def __init__(self, net: nn.Module, criterion: PDDMLoss):
        super().__init__()
        self.net, self.criterion = net, criterion


# ----------------------------------------------------------------------------------------------- persistence


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
        _barrier()
        staging.mkdir(parents=True, exist_ok=True)
        return staging

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        if checkpoint_dir is None:
            return
        rank, _ = rank_and_world()
        _barrier()
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
        _barrier()


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


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------------------------- helpers


def lr_lambda(cfg: RunConfig):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` at ``train.steps``."""
    warm, total, floor = cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def param_groups(cfg: RunConfig, net, criterion: PDDMLoss) -> list[dict]:
    """Backbone at ``optim.lr``; new layers (embedding, PDDM unit) at ``optim.head_lr`` (10 x lr)."""
    head_lr = cfg.optim.head_lr or 10 * cfg.optim.lr
    backbone, new = net.param_groups()
    groups = [
        {"params": backbone, "lr": cfg.optim.lr, "name": "backbone"},
        {"params": new + list(criterion.parameters()), "lr": head_lr, "name": "heads"},
    ]
    return [g for g in groups if g["params"]]


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


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


@torch.no_grad()
def validate(cfg: RunConfig, net: nn.Module, device: torch.device, ks=(1, 2, 4, 8)) -> dict[str, float]:
    """Recall@K on the validation split: each rank embeds its shards, rank 0 searches the whole set."""
    urls = resolve_shards(cfg.data.val_shards).urls
    loader = torch.utils.data.DataLoader(
        EvalDataset(urls, cfg.data.image_size, cfg.data.max_skip_rate),
        batch_size=256,
        num_workers=min(cfg.data.loader_workers, len(urls)),
    )
    was = net.training
    net.eval()
    dtype = next(net.parameters()).dtype
    embs, labels, index = [], [], []
    for x, y, idx in loader:
        embs.append(net(normalize_batch(x.to(device), dtype=dtype)).float().cpu())
        labels.append(y)
        index.append(idx)
        if cfg.data.val_max_images and sum(len(i) for i in index) >= cfg.data.val_max_images:
            break
    net.train(was)
    local = (
        torch.cat(embs).numpy() if embs else np.zeros((0, cfg.model.embed_dim), np.float32),
        torch.cat(labels).numpy() if labels else np.zeros(0, np.int64),
        torch.cat(index).numpy() if index else np.zeros(0, np.int64),
    )
    rank, world = rank_and_world()
    parts = [local]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, local)
    result = [None]
    if rank == 0:
        e = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        recall = recall_at_k(e, y, ks) if len(e) > 1 else {k: float("nan") for k in ks}
        result = [{f"val_recall@{k}": v for k, v in recall.items()} | {"val_images": float(len(e))}]
    if world > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]


class MetricsLog:
    """Rank 0: a JSONL file, TensorBoard curves and a progress bar with ETA."""

    def __init__(self, out: Path, enabled: bool, total: int, start: int, progress: bool):
        self.enabled = enabled
        self.bar = self.tb = self.jsonl = None
        if not enabled:
            return
        from tqdm.auto import tqdm

        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "metrics.jsonl", "a")  # noqa: SIM115 -- lives as long as the run
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(out / "tensorboard"))
        # Under Ray (or any log file) each refresh becomes a line: refresh every 10 s there, not 10 times a second.
        interval = 0.1 if sys.stderr.isatty() else 10.0
        self.bar = tqdm(
            total=total,
            initial=start,
            unit="step",
            desc="train",
            disable=not progress,
            dynamic_ncols=True,
            mininterval=interval,
            maxinterval=max(10.0, interval),
        )

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k.replace("@", "_at_"), v, step)
        if self.bar is not None and "loss" in metrics:
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.3f}",
                spread=f"{metrics.get('spread', 0):.2f}",
                img_s=f"{metrics.get('images_per_s', 0):.0f}",
            )

    def flush(self) -> None:
        for h in (self.tb, self.jsonl):
            if h is not None:
                h.flush()

    def close(self) -> None:
        for h in (self.bar, self.tb, self.jsonl):
            if h is not None:
                h.close()


# ---------------------------------------------------------------------------------------------------- loop


def run_worker(cfg: RunConfig, persistence: Persistence, out: RunOutput) -> dict:
    """Train until ``train.steps``, resuming from the latest checkpoint when there is one. Returns the last
    metrics (on every rank). Rank 0 writes the run's files to ``out`` (copied up at each checkpoint and at
    the end when the storage is remote)."""
    import deepspeed

    # DeepSpeed 0.19's ZeRO all-gather calls a torch.distributed API that torch 2.14 deprecates: once per step.
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor` is deprecated", category=FutureWarning)
    rank, world = rank_and_world()
    # webdataset's node splitter and the loader workers read the rank from the environment.
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    device = _device(cfg)
    torch.manual_seed(cfg.train.seed)
    net = create_model(cfg.model).to(device)
    criterion = PDDMLoss(cfg.model.embed_dim, **dataclasses.asdict(cfg.loss)).to(device)  # LossConfig mirrors it
    module = Trainable(net, criterion)
    optimizer = torch.optim.AdamW(
        param_groups(cfg, net, criterion), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world),
        dist_init_required=world > 1 and not dist.is_initialized(),
    )

    start, resumed_baseline, data_state = 0, {}, None
    with persistence.latest() as ckpt:
        if ckpt is not None:
            engine.load_checkpoint(str(ckpt), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
            state = json.loads((ckpt / CLIENT_STATE).read_text())
            start = state["step"]
            resumed_baseline = state.get("baseline", {})
            rng_file = ckpt / f"rng_rank{rank}.pt"
            if rng_file.exists():
                _set_rng_state(torch.load(rng_file, weights_only=False))
            data_file = ckpt / f"data_rank{rank}.json"  # where this rank's stream stood: it continues from there
            if data_file.exists():
                data_state = StreamState.from_json(data_file.read_text())
            else:  # a rank the saved run did not have: all ranks start the epoch after the furthest one
                data_state = StreamState(layout={}, epoch_all=state.get("data_epoch", 0))
            if rank == 0:
                log.info("resumed from %s at step %d", ckpt, start)

    if start >= cfg.train.steps:  # a finished run asked again: report where it stands
        if rank == 0:
            log.info("already at step %d of %d; raise train.steps to train further", start, cfg.train.steps)
        final = validate(cfg, engine.module.net, device) if cfg.data.val_shards else {}
        return resumed_baseline | final | {"step": start}

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
    dataset = PKBatchDataset(
        shard_set,
        cfg.data.classes_per_batch,
        cfg.data.images_per_class,
        image_size=cfg.data.image_size,
        buffer_images=cfg.data.buffer_images,
        max_skip_rate=cfg.data.max_skip_rate,
        seed=cfg.train.seed,
        transform=train_transform(cfg.data.image_size, crop_scale=cfg.data.crop_scale, hflip=cfg.data.hflip),
        start=data_state,
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
    param_dtype = next(engine.module.net.parameters()).dtype  # bf16 under DeepSpeed's bf16 mode
    last: dict = {}
    baseline: dict = resumed_baseline  # the untrained network's Recall@K ("val0_*"), beside the current one
    nonfinite = skipped_steps = 0
    step = start
    if cfg.data.val_shards and start == 0:
        initial = validate(cfg, engine.module.net, device)
        metrics_log.write(0, initial)
        baseline = {k.replace("val_", "val0_"): v for k, v in initial.items()}
    try:
        while step < cfg.train.steps:
            timed = (step + 1) % cfg.train.log_every == 0 or step + 1 == cfg.train.steps
            t0 = time.perf_counter()
            images, labels, _, where = next(loader)
            stream_state.advance(where)  # spent even if the step is skipped
            images = normalize_batch(images.to(device, non_blocking=True), dtype=param_dtype)
            labels = labels.to(device)
            t_data = time.perf_counter()
            emb = engine.module.net(images)
            if timed:
                _sync(device)
            t_fwd = time.perf_counter()
            batch = gather_batch(emb, labels)
            if timed:
                _sync(device)
            t_comm = time.perf_counter()
            loss, stats = engine.module.criterion.pool_loss(batch)
            finite = torch.isfinite(loss.detach()).float()
            if world > 1:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if timed:
                _sync(device)
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
            engine.backward(loss)
            engine.step()
            if timed:
                _sync(device)
            t_step = time.perf_counter()
            step += 1
            metrics_log.step()
            if timed:
                total = t_step - t0
                last = {
                    "loss": float(loss.detach()),
                    **stats.as_dict(),
                    "lr": optimizer.param_groups[0]["lr"],
                    "head_lr": optimizer.param_groups[-1]["lr"],
                    "images_per_s": world * len(labels) / total,
                    "skipped_steps": float(skipped_steps),
                    "data_epoch": float(where.epoch),
                    "data_used": where.used / max(1, where.read),  # of this reader's samples so far this epoch
                    "time_data": t_data - t0,
                    "time_forward": t_fwd - t_data,
                    "time_comm": t_comm - t_fwd,
                    "time_mining_loss": t_loss - t_comm,
                    "time_backward_step": t_step - t_loss,
                    "time_step": total,
                }
            val_due = cfg.data.val_shards and (
                (cfg.train.val_every and step % cfg.train.val_every == 0) or step == cfg.train.steps
            )
            if val_due:
                last = last | validate(cfg, engine.module.net, device)
            ckpt_due = step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps
            if timed or ckpt_due or val_due:
                metrics_log.write(step, last)
            if ckpt_due:
                stream_state.epoch_all = _max_over_ranks(stream_state.epoch, device)
                staging = _save(engine, persistence, cfg, step, stream_state, rank, last, baseline)
                persistence.report({"step": step, **baseline, **last}, staging)
                if rank == 0:
                    metrics_log.flush()
                    out.push()
            elif timed:  # metrics only (Ray tracks them; the local run has its JSONL)
                persistence.report({"step": step, **baseline, **last}, None)
        if rank == 0:
            export_model(engine.module.net, out.local / "model.pt")
    finally:
        metrics_log.close()
        if rank == 0:
            out.push()
        out.close()
    return baseline | last | {"step": step}


def _save(
    engine, persistence, cfg: RunConfig, step: int, stream: StreamState, rank: int, metrics: dict, baseline: dict
) -> Path:
    """A complete checkpoint in a staging folder: DeepSpeed state (every rank its partition), client state,
    per-rank RNG and data position, the resolved config and an exported plain-PyTorch model (rank 0)."""
    staging = persistence.staging_dir(step)
    engine.save_checkpoint(str(staging), tag=TAG, client_state={"step": step})
    torch.save(_rng_state(), staging / f"rng_rank{rank}.pt")
    (staging / f"data_rank{rank}.json").write_text(stream.to_json())
    if rank == 0:
        (staging / CLIENT_STATE).write_text(
            json.dumps(
                {
                    "step": step,
                    "data_epoch": stream.epoch_all,
                    "metrics": metrics,
                    "baseline": baseline,
                    "config": cfg.to_dict(),
                }
            )
        )
        export_model(engine.module.net, staging / "model.pt")
    return staging


def own_log_handler() -> None:
    """distpddm's INFO messages on stderr through a handler of its own, whatever level Ray gives the root
    logger of its workers (a local cluster quiets Ray's own INFO lines)."""
    top = logging.getLogger("distpddm")
    if not any(getattr(h, "_distpddm", False) for h in top.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._distpddm = True
        top.addHandler(handler)
    top.setLevel(logging.INFO)
    top.propagate = False


def ray_train_loop(loop_config: dict) -> None:
    """Entry point of every Ray Train worker (``TorchTrainer(train_loop_per_worker=...)``)."""
    own_log_handler()
    run_worker(from_dict(loop_config["config"]), RayPersistence(), RunOutput(loop_config["output"]))
