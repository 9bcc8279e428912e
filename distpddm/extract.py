"""Embedding extraction for evaluation: every sample of a split once, on one process or many, written so that
metrics can be recomputed without embedding again.

Each rank embeds its readers' runs of the split (:class:`~distpddm.data.evalset.EvalDataset`) and writes a
part file (``part-<rank>.npz``: positions, labels, keys, embeddings). :func:`merge_parts` puts the parts
together in split order -- ``embeddings.npy`` (float32 N x D), ``labels.npy`` (int64 N), ``keys.npy`` and
``positions.npy`` (each row's position in the split) -- writing the embeddings through a memory map, one part
at a time: a merge holds one part's embeddings plus the O(N) positions, labels and keys (at 9M rows about
0.2 GB of integers and 0.6 GB of 16-character keys), never all N x D embeddings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

EMBEDDINGS, LABELS, KEYS, POSITIONS = "embeddings.npy", "labels.npy", "keys.npy", "positions.npy"


@dataclass
class Part:
    positions: np.ndarray  # int64: each row's position in the split
    labels: np.ndarray  # int64
    keys: np.ndarray  # str
    embeddings: np.ndarray  # float32 (n, D)

    def save(self, path: str | Path) -> None:
        tmp = Path(f"{path}.tmp.npz")
        np.savez(tmp, positions=self.positions, labels=self.labels, keys=self.keys, embeddings=self.embeddings)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Part:
        with np.load(path) as z:
            return cls(z["positions"], z["labels"], z["keys"], z["embeddings"])


@torch.no_grad()
def embed_split(
    net: nn.Module,
    dataset: torch.utils.data.IterableDataset,
    *,
    device: torch.device,
    batch_size: int = 256,
    workers: int = 2,
    progress: bool = False,
    normalize=None,
    dim: int | None = None,
) -> Part:
    """This rank's share of ``dataset`` (an :class:`EvalDataset`), embedded in eval mode. ``dim``: the
    embedding width, so that a rank given no rows still returns (0, dim) (collectives need equal widths)."""
    from .data.transforms import normalize_batch

    normalize = normalize or normalize_batch
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    was = net.training
    net.eval()
    pos, lab, keys, emb = [], [], [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(unit="img", desc="embed", dynamic_ncols=True)
    try:
        for x, y, p, k in loader:
            emb.append(net(normalize(x.to(device, non_blocking=True))).float().cpu().numpy())
            lab.append(y.numpy())
            pos.append(p.numpy())
            keys.extend(k)
            if bar is not None:
                bar.update(len(y))
    finally:
        net.train(was)
        if bar is not None:
            bar.close()
    dim = emb[0].shape[1] if emb else (dim or getattr(getattr(net, "embed", None), "out_features", 0))
    return Part(
        np.concatenate(pos).astype(np.int64) if pos else np.zeros(0, np.int64),
        np.concatenate(lab).astype(np.int64) if lab else np.zeros(0, np.int64),
        np.array(keys, dtype=str),
        np.concatenate(emb) if emb else np.zeros((0, dim), np.float32),
    )


def part_path(out: str | Path, rank: int) -> Path:
    return Path(out) / f"part-{rank:05d}.npz"


def merge_parts(out: str | Path, world: int, *, remove: bool = True) -> int:
    """Merge ``part-*.npz`` of ``world`` ranks into split order in ``out``; returns the row count. A sample
    embedded twice (a bug upstream) is an error, not a silent duplicate."""
    out = Path(out)
    paths = [part_path(out, r) for r in range(world)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{out}: parts missing ({', '.join(missing[:5])}): a rank did not finish")
    positions = []
    dim = 0
    for p in paths:
        with np.load(p) as z:
            positions.append(z["positions"])
            if len(z["positions"]):
                dim = dim or z["embeddings"].shape[1]
    everything = np.concatenate(positions)
    order = np.sort(everything)
    if len(order) and (np.diff(order) == 0).any():
        dup = order[1:][np.diff(order) == 0][:5].tolist()
        raise ValueError(f"{out}: samples embedded more than once (split positions {dup})")
    n = len(order)
    emb = np.lib.format.open_memmap(out / f"{EMBEDDINGS}.tmp.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    labels = np.empty(n, np.int64)
    keys: list[np.ndarray] = [None] * world  # placed below
    key_rows = []
    for r, p in enumerate(paths):
        part = Part.load(p)
        rows = np.searchsorted(order, part.positions)
        if len(rows):
            emb[rows] = part.embeddings
            labels[rows] = part.labels
        keys[r] = part.keys
        key_rows.append(rows)
    emb.flush()
    del emb
    width = max((k.dtype.itemsize // 4 for k in keys if len(k)), default=1)
    all_keys = np.empty(n, dtype=f"<U{width}")
    for rows, k in zip(key_rows, keys, strict=True):
        all_keys[rows] = k
    np.save(out / LABELS, labels)
    np.save(out / KEYS, all_keys)
    np.save(out / POSITIONS, order)
    (out / f"{EMBEDDINGS}.tmp.npy").replace(out / EMBEDDINGS)
    if remove:
        for p in paths:
            p.unlink()
    return n


def load_embeddings(folder: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(embeddings, labels, keys) of an extraction folder, checked: one-line errors for what cannot be used."""
    folder = Path(folder)
    for name in (EMBEDDINGS, LABELS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder}: no {name} (an extraction folder from `distpddm eval --out`)")
    emb = np.load(folder / EMBEDDINGS, mmap_mode="r")
    labels = np.load(folder / LABELS)
    keys = np.load(folder / KEYS) if (folder / KEYS).is_file() else np.arange(len(labels)).astype(str)
    if emb.ndim != 2:
        raise ValueError(f"{folder / EMBEDDINGS}: expected a 2-d array, got shape {emb.shape}")
    if len(emb) != len(labels) or len(keys) != len(labels):
        raise ValueError(
            f"{folder}: {len(emb)} embedding rows but {len(labels)} labels and {len(keys)} keys; re-extract"
        )
    return np.asarray(emb, dtype=np.float32), labels.astype(np.int64), keys


def write_json(path: str | Path, data: dict) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
