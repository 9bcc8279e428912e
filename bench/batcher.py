"""The P x K batcher on class distributions real data has: how many batches one pass forms, the share of
samples placed in batches, the most samples held, and the cost per sample. Labels only (no images), in the
shard builder's layout (each class cut into chunks of 4, its default until it became 8; chunk order shuffled),
one reader.

    python bench/batcher.py
"""

from __future__ import annotations

import random
import time

import numpy as np

from distpddm.data.batcher import PKBatcher


def chunked(sizes, chunk: int = 4, seed: int = 0) -> list[int]:
    chunks = [(c, min(chunk, n - s)) for c, n in enumerate(sizes) for s in range(0, n, chunk)]
    random.Random(seed).shuffle(chunks)
    return [c for c, m in chunks for _ in range(m)]


def one_pass(labels: list[int], P: int, K: int, buffer: int) -> dict:
    b = PKBatcher(P, K, buffer, np.random.default_rng(0))
    batches, peak = 0, 0
    start = time.perf_counter()
    for p, label in enumerate(labels):
        batches += len(b.push(p, label))
        peak = max(peak, b.held)
        b.dropped.clear()
    batches += len(b.finish())
    seconds = time.perf_counter() - start
    return {"batches": batches, "used": b.stats.used / len(labels), "peak": peak, "us": 1e6 * seconds / len(labels)}


def main() -> None:
    rng = np.random.default_rng(0)
    cases = {
        "the issue's set: 52 classes, P 16 x K 4, buffer 512": (
            [int(10 * 40 ** (i / 51)) for i in range(52)], 16, 4, 512),
        "ImageNet-10K-like: 10,000 classes, log-normal sizes, P 32 x K 4, buffer 4096": (
            np.clip(np.round(rng.lognormal(4.3, 0.7, 10_000)), 5, None).astype(int).tolist(), 32, 4, 4096),
        "the rehearsal's tail: 10,000 classes, P 16 x K 4, buffer 512": (
            np.round(5 * 30 ** (rng.random(10_000) ** 2.2)).astype(int).tolist(), 16, 4, 512),
        "one dominant class (16 of 4 images, one of 20,000), P 16 x K 4, buffer 256": (
            [4] * 16 + [20_000], 16, 4, 256),
    }  # fmt: skip
    print(
        "| case | class sizes (min / mean / max) | samples | batches | samples in batches | most held | us per sample |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, (sizes, P, K, buffer) in cases.items():
        labels = chunked(sizes)
        r = one_pass(labels, P, K, buffer)
        spread = f"{min(sizes)} / {np.mean(sizes):.0f} / {max(sizes)}"
        print(
            f"| {name} | {spread} | {len(labels):,} | {r['batches']:,} | {100 * r['used']:.1f}% | {r['peak']} "
            f"| {r['us']:.1f} |"
        )


if __name__ == "__main__":
    main()
