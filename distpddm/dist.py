"""The process group as the rest of distpddm sees it: rank and world, this process's device, and collectives
that also work in a world of one (padded gathers with or without gradient, sums, any-rank and max-rank flags,
barriers), plus :func:`agree`, which turns one rank's deterministic failure into every rank's.

Every collective here must be called by every rank of the group, in the same order: the trainer's
``train_step`` says which it calls and when.
"""

from __future__ import annotations

import os
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor

from .errors import DeterministicError, StorageUnavailable


def is_distributed(group=None) -> bool:
    """A process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world(group=None) -> tuple[int, int]:
    """(rank, world size) in the process group; (0, 1) without one."""
    if is_distributed(group):
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def env_rank_and_world() -> tuple[int, int]:
    """The environment first (what the trainer sets, and all a forked loader worker can trust), then the
    process group."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank_and_world()


def init_device(use_gpu: bool) -> torch.device:
    """This rank's GPU (``LOCAL_RANK``, made current) when asked for and present, else the CPU."""
    if use_gpu and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def device_time(device: torch.device) -> float:
    """``time.perf_counter()`` once the device's queued work is done (a CUDA step is asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    return F.pad(x, [0, 0] * (x.dim() - 1) + [0, rows - x.shape[0]])


def all_gather_rows(
    x: Tensor, group=None, *, grad: bool = False, sizes: list[int] | None = None
) -> tuple[Tensor, list[int]]:
    """Every rank's rows of ``x`` (row counts may differ), concatenated in rank order, and each rank's count
    (pass ``sizes`` when known: one collective less).

    ``grad=True`` keeps the graph: the backward pass sums what every rank's loss put on this rank's rows
    (``torch.distributed.nn``: reduce-scatter on NCCL, all-to-all and a sum on gloo)."""
    if not is_distributed(group):
        return x, [x.shape[0]]
    _, world = rank_and_world(group)
    if sizes is None:
        n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
        counts = [torch.empty_like(n) for _ in range(world)]
        dist.all_gather(counts, n, group=group)
        sizes = [int(c) for c in counts]
    padded = _pad_rows(x, max(sizes))
    if grad:
        with warnings.catch_warnings():  # deprecated for a private module (_functional_collectives); kept
            warnings.simplefilter("ignore", FutureWarning)
            parts = dist_fn.all_gather(padded, group=group)
    else:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.detach(), group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]), sizes


def all_gather_same(x: Tensor, group=None) -> Tensor:
    """A same-shaped tensor from every rank, stacked: ``(world, *x.shape)``, no gradient."""
    if not is_distributed(group):
        return x.detach()[None]
    _, world = rank_and_world(group)
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.detach().contiguous(), group=group)
    return torch.stack(out)


def all_reduce_sum(x: Tensor, group=None) -> Tensor:
    """The sum over ranks of a tensor (no gradient); the tensor itself in a world of one."""
    if not is_distributed(group):
        return x
    x = x.detach().clone()
    dist.all_reduce(x, group=group)
    return x


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is True on any rank."""
    return bool(max_over_ranks(int(flag), device))


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` any rank holds, on every rank."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def all_finite(x: Tensor) -> bool:
    """Whether ``x`` is finite on every rank (one all-reduce), so that every rank skips a step together."""
    finite = torch.isfinite(x.detach()).all().float().reshape(1)
    if is_distributed():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item() == 1)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (picklable): one rank's view of a shared folder, so that every rank
    acts on the same listing even where a network file system shows each node its own."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def unwrap(error: DeterministicError) -> DeterministicError:
    """The error as raised, without the traceback a DataLoader worker's re-raise puts into its message."""
    text = str(error)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return error
    marker = f"{type(error).__module__}.{type(error).__name__}: "
    original = text.rsplit(marker, 1)[-1].strip() if marker in text else text.strip().splitlines()[-1]
    return type(error)(original)


def agree(error: DeterministicError | None, device: torch.device) -> None:
    """Raise a :class:`DeterministicError` on every rank when any rank brings one (naming each failing rank):
    the others would otherwise wait in the next collective until the process group's timeout."""
    error = None if error is None else unwrap(error)
    _, world = rank_and_world()
    if world == 1:
        if error is not None:
            raise error
        return
    if not any_rank(error is not None, device):
        return
    messages: list = [None] * world
    dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}")
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if error is not None and len(failed) == 1:
        raise error
    text = "; ".join(f"rank {r}: {m}" for r, m in failed)
    outage = all(m.startswith(f"{StorageUnavailable.__name__}: ") for _, m in failed)  # Ray may retry it
    raise (type(error) if error is not None else StorageUnavailable if outage else DeterministicError)(text)
