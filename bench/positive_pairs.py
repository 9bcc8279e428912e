"""How varied the training stream's positives are: over the first N batches of a split, how many distinct groups
of K and distinct positive pairs (two images of one class in one group) the product's P x K stream gives.

    .venv/bin/python bench/positive_pairs.py SPLIT_DIR [--P 16 --K 4 --batches 200 --seed 0]

With groups taken as whole build-time chunks, an image met the same K - 1 positives in every epoch; the batcher
now draws each class's K among its waiting samples (docs/benchmarks.md, "Positive pairs").
"""

from __future__ import annotations

import argparse
import itertools
from collections import Counter

from distpddm.data.stream import PKBatchDataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("split")
    p.add_argument("--P", type=int, default=16)
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    ds = PKBatchDataset(args.split, args.P, args.K, image_size=16, seed=args.seed)
    groups, pairs, n = Counter(), Counter(), 0
    for batch in itertools.islice(iter(ds), args.batches):
        keys = batch.keys.tolist()
        for g in range(args.P):
            group = tuple(sorted(keys[g * args.K : (g + 1) * args.K]))
            groups[group] += 1
            pairs.update(itertools.combinations(group, 2))
        n += 1
    print(
        f"{n} batches of {args.P} x {args.K}: {sum(groups.values())} groups used, {len(groups)} distinct; "
        f"{sum(pairs.values())} positive pairs used, {len(pairs)} distinct"
    )


if __name__ == "__main__":
    main()
