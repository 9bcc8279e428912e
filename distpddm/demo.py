"""CPU demo: train a small CNN with PDDMLoss on real glyph images, print held-out Recall@K.

Classes are fonts (Debian's fonts-aenigma); train and test fonts are disjoint, so the test is open-set
retrieval as in the paper's CUB / CARS196 protocol. ``python -m distpddm.demo --help`` for options.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time

import numpy as np
import torch

from .data.glyphs import FontsNotFound, load_glyphs
from .evaluate import recall_at_k
from .loss import DISTANCES, METRICS, PDDMLoss
from .miners import MINERS, POSITIVES
from .model import SmallCNN
from .train.inmemory import fit_in_memory


def _fmt(recall: dict[int, float]) -> str:
    return "  ".join(f"R@{k} {v:.3f}" for k, v in recall.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distpddm.demo", description=__doc__)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--fonts", nargs="*", default=None, help="font folders (default: fonts-aenigma)")
    p.add_argument("--max-fonts", type=int, default=None)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--classes-per-batch", type=int, default=16)
    p.add_argument("--images-per-class", type=int, default=4)
    p.add_argument("--metric", choices=METRICS, default="pddm")
    p.add_argument("--miner", choices=[m for m in MINERS if m != "semihard"], default="hard")
    p.add_argument("--distance", choices=DISTANCES, default="euclidean")
    # The loss's and miner's own defaults: the setting chosen on validation classes (docs/results.md).
    loss, miner = inspect.signature(PDDMLoss).parameters, inspect.signature(MINERS["hard"]).parameters
    p.add_argument("--alpha", type=float, default=loss["alpha"].default)
    p.add_argument("--beta", type=float, default=loss["beta"].default)
    p.add_argument("--lam", type=float, default=loss["lam"].default)
    p.add_argument("--positives", choices=POSITIVES, default=miner["positives"].default, help="quadruplets per anchor")
    p.add_argument("--negatives", type=int, default=1, help="hardest negatives per positive pair")
    p.add_argument("--metric-grad", action=argparse.BooleanOptionalAction, default=loss["metric_grad"].default,
                   help="back-propagate E_m into the embedding too")  # fmt: skip
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    try:
        glyphs = load_glyphs(args.fonts, max_fonts=args.max_fonts)
    except FontsNotFound as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train, test = glyphs.split(0.5, seed=args.seed)
    print(
        f"glyphs: {len(glyphs.class_names)} fonts x 62 glyphs; train {len(train.class_names)} fonts "
        f"({len(train)} images), held-out test {len(test.class_names)} fonts ({len(test)} images)"
    )
    raw = recall_at_k(test.images.reshape(len(test), -1).astype(np.float32), test.labels)
    print(f"raw pixels          {_fmt(raw)}")

    model = SmallCNN(args.embed_dim)
    miner = MINERS[args.miner]() if args.miner != "hard" else MINERS["hard"](args.positives, args.negatives)
    criterion = PDDMLoss(
        args.embed_dim,
        metric=args.metric,
        distance=args.distance,
        alpha=args.alpha,
        beta=args.beta,
        lam=args.lam,
        metric_grad=args.metric_grad,
        miner=miner,
    )
    print(f"training {args.steps} steps: SmallCNN from random init + PDDMLoss({criterion.extra_repr()})")
    start = time.perf_counter()
    result = fit_in_memory(
        model,
        criterion,
        train.images,
        train.labels,
        test.images,
        test.labels,
        steps=args.steps,
        classes_per_batch=args.classes_per_batch,
        images_per_class=args.images_per_class,
        lr=args.lr,
        seed=args.seed,
    )
    print(f"untrained network   {_fmt(result.recall_before)}")
    print(f"after {args.steps:>4} steps    {_fmt(result.recall_after)}")
    last = result.history[-1]
    print(
        f"last step: loss {last['loss']:.3f}  spread {last['spread']:.3f}  "
        f"pos score {last['pos_score']:.3f}  neg score {last['neg_score']:.3f}  "
        f"({time.perf_counter() - start:.0f} s)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "raw": raw,
                    "before": result.recall_before,
                    "after": result.recall_after,
                    "history": result.history,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
