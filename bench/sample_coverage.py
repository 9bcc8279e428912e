"""Does every training sample reach a batch? Over ``--epochs`` epochs of a built split, labels only: the
product's reader ranges (``epochs.reader_ranges``) and batcher (``PKBatcher``, seeded as the stream seeds it),
beside the same with the readers' cut points fixed (as they were before they moved each epoch).

    .venv/bin/python bench/sample_coverage.py SPLIT_DIR [--epochs 28 --P 16 --K 4 --readers 1]

Prints, per order: the share of samples placed in batches per epoch, the share ever placed, the samples never
placed, and the same for the largest class and for classes under 20 images (docs/benchmarks.md, "Positive
pairs").
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np
from chunk_groups import reader_batches  # bench/ is on sys.path when this runs as a script

from distpddm.data.epochs import reader_ranges
from distpddm.data.stream import resolve_shards


def coverage(labels: np.ndarray, counts: list[int], ranges, args) -> dict:
    samples = np.arange(len(labels))
    uses, per_epoch = np.zeros(len(labels), np.int64), []
    for epoch in range(args.epochs):
        placed = 0
        for reader in range(args.readers):
            batches, _ = reader_batches(counts, ranges, samples, labels, args, epoch, reader)
            for b in batches:
                uses[b] += 1
                placed += len(b)
        per_epoch.append(placed / len(labels))
    sizes = np.bincount(labels)
    small, big = np.isin(labels, np.flatnonzero(sizes < 20)), labels == np.argmax(sizes)
    return {
        "per_epoch": float(np.mean(per_epoch)),
        "ever": float(np.mean(uses > 0)),
        "never": int((uses == 0).sum()),
        "largest": (int(sizes.max()), float(np.mean(uses[big] > 0))),
        "small": float(np.mean(uses[small] > 0)) if small.any() else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("split")
    p.add_argument("--epochs", type=int, default=28)
    p.add_argument("--P", type=int, default=16)
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--readers", type=int, default=1, help="ranks x loader workers")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    shard_set = resolve_shards(args.split)
    labels = np.concatenate(
        [np.load(Path(args.split) / (Path(u).name.removesuffix(".tar") + ".idx.npz"))["labels"] for u in shard_set.urls]
    )
    print(f"{args.split}: {len(labels)} samples, {len(shard_set.counts)} shards, {args.epochs} epochs of "
          f"{args.P} x {args.K}, {args.readers} readers")  # fmt: skip
    print("| order | placed per epoch | ever placed | never placed | largest class: ever placed | classes < 20: ever |")
    print("|---|---|---|---|---|---|")
    fixed = functools.partial(reader_ranges, moving_cut=False)
    for name, ranges in (("cut points fixed (before)", fixed), ("cut points moved per epoch", reader_ranges)):
        r = coverage(labels, shard_set.counts, ranges, args)
        small = "–" if r["small"] is None else f"{r['small']:.1%}"
        print(f"| {name} | {r['per_epoch']:.1%} | {r['ever']:.1%} | {r['never']} | {r['largest'][1]:.1%} of "
              f"{r['largest'][0]} | {small} |")  # fmt: skip


if __name__ == "__main__":
    main()
