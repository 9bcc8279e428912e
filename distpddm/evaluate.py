"""Retrieval evaluation: Recall@K with exact Euclidean nearest neighbours (faiss), the query left out."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


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
