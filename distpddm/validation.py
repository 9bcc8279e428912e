"""The trainer's periodic held-out validation: Recall@K, R-Precision and MAP@R on ``data.val_shards``, with
the reading and metrics of ``distpddm eval`` (:mod:`.evalset`, :mod:`.retrieval`), spread over the ranks.

Each rank embeds its share of the first ``data.val_max_images`` images, receives the whole set as the
gallery and searches only its own rows as queries; the sums are all-reduced, so no rank idles while another
searches. (NMI and transfer need the whole set in one place: ``distpddm eval``.)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .dist import agree, all_gather_rows, is_distributed, rank_and_world
from .errors import DeterministicError

VAL_KS = (1, 2, 4, 8)


class Validator:
    """When to validate (:meth:`should_validate`) and the validation itself (``validator(net)``): every
    ``train.val_every`` steps and at the last step, and (``train.val_at_start``) the untrained network."""

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device
        self.enabled = bool(cfg.data.val_shards)

    def should_validate(self, step: int) -> bool:
        every, last = self.cfg.train.val_every, self.cfg.train.steps
        return self.enabled and ((every and step % every == 0) or step == last)

    def at_start(self, step: int) -> bool:
        return self.enabled and self.cfg.train.val_at_start and step == 0

    def __call__(self, net: nn.Module) -> dict[str, float]:
        return validate(self.cfg, net, self.device)


def validate(cfg, net: nn.Module, device: torch.device, ks=VAL_KS) -> dict[str, float]:
    """``val_recall@K``, ``val_r_precision``, ``val_map@r`` and ``val_images``; a collective: every rank calls
    it, and a split one rank cannot read stops every rank together (:func:`~.dist.agree`)."""
    from .data.evalset import eval_dataset
    from .extract import embed_split
    from .retrieval import finish_sums, retrieval_sums

    rank, world = rank_and_world()
    part, error = None, None
    try:
        dataset = eval_dataset(
            cfg.data.val_shards,
            cfg.data.image_size,
            cfg.data.max_skip_rate,
            limit=cfg.data.val_max_images,
            rank=rank,
            world=world,
        )
        part = embed_split(
            net, dataset, device=device, workers=min(cfg.data.loader_workers, 4), dim=cfg.model.embed_dim
        )
    except DeterministicError as e:
        error = e
    except (ValueError, OSError) as e:  # a split this node cannot read: every rank must hear of it
        error = DeterministicError(f"validation data {cfg.data.val_shards}: {e}")
    agree(error, device)
    emb, sizes = all_gather_rows(torch.from_numpy(part.embeddings).float().to(device))
    labels, _ = all_gather_rows(torch.from_numpy(part.labels).to(device), sizes=sizes)
    emb, labels = emb.cpu().numpy(), labels.cpu().numpy()
    mine = np.arange(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    try:  # the same data on every rank: every rank raises together, or none does
        sums = retrieval_sums(emb, labels, ks, queries=mine) if len(emb) > 1 else None
    except ValueError as e:  # no class with two images, non-finite embeddings
        raise DeterministicError(f"validation on {cfg.data.val_shards}: {e}") from None
    if sums is not None and is_distributed():
        sums = _all_reduce_sums(sums, device)
    figures = finish_sums(sums) if sums is not None else {}
    out = {f"val_{k}": float(v) for k, v in figures.items() if k.startswith("recall@") or k in ("r_precision", "map@r")}
    return out | {"val_images": float(len(emb))}


def _all_reduce_sums(sums: dict, device: torch.device) -> dict:
    keys = sorted(k for k, v in sums.items() if isinstance(v, (int, float, np.integer, np.floating)))
    t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return sums | {k: float(v) for k, v in zip(keys, t.cpu().tolist(), strict=True)}
