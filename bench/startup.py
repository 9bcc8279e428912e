"""Per-rank start-up cost of the training stream at scale: what every one of 64 ranks does before its first
batch, on a synthetic ``index.json`` of ImageNet-10K's shape (no shard files are needed for this part).

Every rank reads the split's ``index.json`` (one line per shard, the class list and counts) and builds the
dataset; every loader worker computes its epoch's ranges (a permutation of the shard numbers). Then a reader
opens only its own shards' indexes, a handful whatever the number of shards (``tests/test_stream.py``).

    python bench/startup.py [--shards 20000] [--classes 10184] [--images 9000000] [--readers 512]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distpddm.data.epochs import reader_ranges  # noqa: E402
from distpddm.data.stream import PKBatchDataset, resolve_shards  # noqa: E402


def best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=20_000)
    p.add_argument("--classes", type=int, default=10_184)
    p.add_argument("--images", type=int, default=9_000_000)
    p.add_argument("--readers", type=int, default=512, help="ranks x loader workers (64 x 8)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    counts = rng.multinomial(args.images, np.full(args.shards, 1 / args.shards))
    index = {
        "classes": [f"n{c:08d}" for c in range(args.classes)],
        "class_counts": rng.multinomial(args.images, np.full(args.classes, 1 / args.classes)).tolist(),
        "samples": args.images,
        "chunk_size": 4,
        "shards": [
            {
                "name": f"shard-{n:06d}.tar",
                "samples": int(c),
                "first_index": 0,
                "bytes": 512 * 2**20,
                "sha256": "0" * 64,
            }
            for n, c in enumerate(counts)
        ],
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.json"
        path.write_text(json.dumps(index, indent=1))
        size = path.stat().st_size
        shard_set = resolve_shards(tmp)
        rows = {
            "read index.json (every rank)": best_of(lambda: resolve_shards(tmp)),
            "build the dataset (every rank)": best_of(lambda: PKBatchDataset(shard_set, 32, 4)),
            "one reader's epoch ranges (every loader worker, every epoch)": best_of(
                lambda: reader_ranges(shard_set.counts, 0, 0, args.readers - 1, args.readers)
            ),
        }
    ranges = reader_ranges(shard_set.counts, 0, 0, args.readers - 1, args.readers)
    print(f"{args.shards} shards, {args.classes} classes, {args.images} images; index.json {size / 2**20:.1f} MiB")
    print("\n| step | ms |\n|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {1e3 * seconds:.1f} |")
    print(f"\nreader {args.readers - 1} of {args.readers} reads {len(ranges)} shard range(s), "
          f"{sum(hi - lo for _, lo, hi in ranges)} samples per epoch")  # fmt: skip


if __name__ == "__main__":
    main()
