"""Do an image's positives change from epoch to epoch? Labels only, at any number of classes: the product's
build-time order (``shards.plan_order``), shards of a fixed sample count, each epoch's reader ranges
(``epochs.reader_ranges``) and the batcher with the generator the stream gives it (``PKBatcher``), no image read.

    .venv/bin/python bench/chunk_groups.py [--classes 10000 --chunks 4 8 16 --P 16 --K 4 --readers 4 --epochs 2]

Per chunk size, over ``--epochs`` epochs of every reader: the share of the second epoch's groups of K that are
exactly a group of the first (the same K - 1 positives again), the distinct positives an image met over all
epochs (at most epochs x (K - 1), and never more than its chunk's other images), and the share of samples placed
in batches (the rest were dropped by the bounded pool). Class sizes are log-normal (``--median``, ``--sigma``),
clipped to ``--min-images``..``--max-images``; the default, 10 to 400, is ImageNet-like (docs/benchmarks.md,
"Positive pairs").
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from distpddm.data.batcher import PKBatcher
from distpddm.data.epochs import reader_ranges, seed_sequence
from distpddm.data.shards import plan_order
from distpddm.data.sources import SplitPlan


def class_labels(args) -> np.ndarray:
    sizes = np.random.default_rng(args.seed).lognormal(np.log(args.median), args.sigma, args.classes)
    sizes = np.clip(sizes, args.min_images, args.max_images).astype(np.int64)
    return np.repeat(np.arange(args.classes, dtype=np.int32), sizes)


def reader_batches(counts, ranges, samples: np.ndarray, labels: np.ndarray, args, epoch: int, reader: int):
    """One reader's batches of one epoch (sample ids) and its batcher's stats, labels only: the shards hold
    ``samples`` in stored order, ``ranges`` cuts them (``epochs.reader_ranges``), the batcher is seeded as the
    stream seeds it."""
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rng = np.random.default_rng(seed_sequence(args.seed, epoch, reader, args.readers, 1))
    batcher, batches = PKBatcher(args.P, args.K, 8 * args.P * args.K, rng), []
    for shard, lo, hi in ranges(counts, args.seed, epoch, reader, args.readers):
        for sample in samples[first[shard] + lo : first[shard] + hi].tolist():
            batches += batcher.push(sample, int(labels[sample]))
    return batches + batcher.finish(), batcher.stats


def epoch_groups(labels, counts, order, args, epoch: int) -> tuple[list[tuple[int, ...]], int, int]:
    """Every reader's groups of K in one epoch (as sorted sample ids), and samples read and used."""
    groups, read, used = [], 0, 0
    for reader in range(args.readers):
        batches, stats = reader_batches(counts, reader_ranges, order, labels, args, epoch, reader)
        for b in batches:
            groups += [tuple(sorted(b[g * args.K : (g + 1) * args.K])) for g in range(args.P)]
        read, used = read + stats.read, used + stats.used
    return groups, read, used


def measure(labels: np.ndarray, chunk: int, args) -> dict:
    split = SplitPlan(classes=[str(c) for c in range(labels.max() + 1)], sources=[""] * len(labels), labels=labels)
    order = plan_order(split, chunk, args.seed)
    counts = [min(args.shard_samples, len(order) - i) for i in range(0, len(order), args.shard_samples)]
    epochs = [epoch_groups(labels, counts, order, args, e) for e in range(args.epochs)]
    partners: dict[int, set[int]] = defaultdict(set)
    for groups, _, _ in epochs:
        for group in groups:
            for s in group:
                partners[s].update(group)
    first, second = set(epochs[0][0]), epochs[1][0]
    return {
        "chunk": chunk,
        "repeated": sum(g in first for g in second) / max(1, len(second)),
        "partners": float(np.mean([len(p) - 1 for p in partners.values()])),
        "used": sum(e[2] for e in epochs) / sum(e[1] for e in epochs),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=10_000)
    p.add_argument("--chunks", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--P", type=int, default=16)
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--readers", type=int, default=4, help="ranks x loader workers")
    p.add_argument("--shard-samples", type=int, default=4000, help="images per shard (512 MB of 128 KB JPEGs)")
    p.add_argument("--median", type=float, default=60, help="class sizes: log-normal median")
    p.add_argument("--sigma", type=float, default=0.8)
    p.add_argument("--min-images", type=int, default=10)
    p.add_argument("--max-images", type=int, default=400)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the repeats compare the second epoch with the first)")
    labels = class_labels(args)
    sizes = np.bincount(labels)
    print(
        f"{args.classes} classes of {sizes.min()} to {sizes.max()} images (mean {sizes.mean():.0f}), {len(labels)} "
        f"images, {args.P} x {args.K}, {args.readers} readers, {args.epochs} epochs"
    )
    most = args.epochs * (args.K - 1)
    print("| chunk size | 2nd-epoch groups repeated from the 1st | distinct positives per image | used |")
    print("|---|---|---|---|")
    for chunk in args.chunks:
        r = measure(labels, chunk, args)
        print(f"| {chunk} | {r['repeated']:.1%} | {r['partners']:.2f} of {most} | {r['used']:.1%} |")


if __name__ == "__main__":
    main()
