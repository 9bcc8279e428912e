"""Failures every worker agrees on.

A :class:`~distpddm.errors.DeterministicError` on one rank (bad data past the threshold, a share that cannot
form a batch) must stop every rank at the same point: the others would otherwise wait in the next collective
until the process group's timeout. :func:`agree` is that point; its error names each failing rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import DeterministicError
from ..gather import rank_and_world


def unwrap(error: DeterministicError) -> DeterministicError:
    """The error as raised, without the traceback a DataLoader worker's re-raise puts into its message."""
    text = str(error)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return error
    marker = f"{type(error).__module__}.{type(error).__name__}: "
    original = text.rsplit(marker, 1)[-1].strip() if marker in text else text.strip().splitlines()[-1]
    return type(error)(original)


def any_rank(flag: bool, device: torch.device) -> bool:
    """Collective: True on every rank when ``flag`` is True on any rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def agree(error: DeterministicError | None, device: torch.device) -> None:
    """Collective: raise a :class:`DeterministicError` on every rank when any rank brings one."""
    error = None if error is None else unwrap(error)
    rank, world = rank_and_world()
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
    raise (type(error) if error is not None else DeterministicError)(text)
