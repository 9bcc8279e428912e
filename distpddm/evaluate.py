"""Retrieval evaluation: Recall@K with exact Euclidean nearest neighbours (faiss), the query left out, and
the trainer's periodic validation built on it."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .errors import DeterministicError


def recall_at_k(embeddings: np.ndarray, labels: np.ndarray, ks: Sequence[int] = (1, 2, 4, 8)) -> dict[int, float]:
    """Fraction of queries whose K nearest other samples include one of their class (each sample a query)."""
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels).reshape(-1)
    if x.ndim != 2 or len(x) != len(labels):
        raise ValueError(f"embeddings {x.shape} and labels {labels.shape} do not match")
    if len(x) < 2:
        raise ValueError("Recall@K needs at least two samples")
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader logs every ISA it tries at INFO
    import faiss

    ks = sorted(set(int(k) for k in ks))
    kmax = min(max(ks), len(x) - 1)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    _, nn_idx = index.search(x, kmax + 1)
    # Drop the query itself; where ties pushed it out of the list, drop the farthest instead.
    own = nn_idx == np.arange(len(x))[:, None]
    own[~own.any(1), -1] = True
    neighbours = nn_idx[~own].reshape(len(x), kmax)
    hits = labels[neighbours] == labels[:, None]
    return {k: float(hits[:, : min(k, kmax)].any(1).mean()) for k in ks}


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Embeddings of ``images`` in eval mode, L2-normalised (as at search time)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [
        torch.nn.functional.normalize(model(images[s : s + batch_size].to(device)), dim=1).float().cpu()
        for s in range(0, len(images), batch_size)
    ]
    model.train(was_training)
    return torch.cat(out).numpy()


@torch.no_grad()
def validate(cfg, net: nn.Module, device: torch.device, ks=(1, 2, 4, 8)) -> dict[str, float]:
    """Recall@K on ``cfg.data.val_shards`` during training: each rank embeds its shards (at most its share of
    ``data.val_max_images``), rank 0 searches the whole set, every rank gets the figures."""
    from .data.stream import EvalDataset, resolve_shards
    from .data.transforms import normalize_batch
    from .gather import rank_and_world
    from .train.faults import agree

    rank, world = rank_and_world()
    cap = math.ceil(cfg.data.val_max_images / world) if cfg.data.val_max_images else None
    embs, labels, error = [], [], None
    was = net.training
    net.eval()
    try:
        urls = resolve_shards(cfg.data.val_shards).urls
        loader = torch.utils.data.DataLoader(
            EvalDataset(urls, cfg.data.image_size, cfg.data.max_skip_rate),
            batch_size=256,
            num_workers=min(cfg.data.loader_workers, len(urls)),
        )
        for x, y, _ in loader:
            embs.append(net(normalize_batch(x.to(device))).float().cpu())
            labels.append(y)
            if cap is not None and sum(len(b) for b in labels) >= cap:
                break
    except DeterministicError as e:
        error = e
    finally:
        net.train(was)
    agree(error, device)
    e = torch.cat(embs).numpy()[:cap] if embs else np.zeros((0, cfg.model.embed_dim), np.float32)
    y = torch.cat(labels).numpy()[:cap] if labels else np.zeros(0, np.int64)
    parts = [(e, y)]
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (e, y))
    result = [None]
    if rank == 0:
        e = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        recall = recall_at_k(e, y, ks) if len(e) > 1 else {k: float("nan") for k in ks}
        result = [{f"val_recall@{k}": v for k, v in recall.items()} | {"val_images": float(len(e))}]
    if world > 1:
        dist.broadcast_object_list(result, src=0)
    return result[0]
