"""Held-out Recall@1 on real glyph images: PDDMLoss variants beside pytorch-metric-learning, same everything.

Same network (SmallCNN from random init, 64-d), data (fonts-aenigma glyphs, train / test fonts disjoint),
P x K batches (16 x 4), optimiser (AdamW 1e-3) and steps for every row; only the criterion differs. Runs
two trainings at a time (one thread each). Usage::

    python bench/losses.py [--steps 1000] [--only pddm pml_ms] [--out docs/losses.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distpddm import BatchHardestQuadrupletMiner, HardQuadrupletMiner, PDDMLoss  # noqa: E402
from distpddm.data.glyphs import load_glyphs  # noqa: E402
from distpddm.evaluate import recall_at_k  # noqa: E402
from distpddm.loss import PAPER_SETTING  # noqa: E402
from distpddm.model import SmallCNN  # noqa: E402
from distpddm.train.inmemory import fit_in_memory  # noqa: E402

DIM = 64

#: name -> (description, PDDMLoss kwargs, or "pml_ms" / "pml_triplet")
VARIANTS: dict[str, tuple[str, dict | str]] = {
    "pddm": ("the paper's setting (alpha .5, beta 1, lam .5, hardest positive; Euclidean distance)", {}),
    "pddm_squared": ("the paper's setting with its squared distance", {"distance": "squared"}),
    "pddm_squared_b02": ("squared distance, beta .2", {"distance": "squared", "beta": 0.2}),
    "pddm_a01_b02": ("PDDMLoss alpha .1, beta .2", {"alpha": 0.1, "beta": 0.2}),
    "pddm_detach": ("the paper's setting, metric head not back-propagated into the embedding", {"metric_grad": False}),
    "pddm_scratch": (
        "the from-scratch settings of collapse.md (alpha .1, beta .2, metric_grad off)",
        {"alpha": 0.1, "beta": 0.2, "metric_grad": False},
    ),
    "pddm_batch": ("the paper's setting, one quadruplet per batch", {"miner": BatchHardestQuadrupletMiner()}),
    "euclidean": ("the paper's setting, metric=euclidean (the paper's baseline miner)", {"metric": "euclidean"}),
    "mahalanobis": ("the paper's setting, metric=mahalanobis", {"metric": "mahalanobis"}),
    "pml_ms": ("pytorch-metric-learning MultiSimilarityLoss + MultiSimilarityMiner", "pml_ms"),
    "pml_triplet": ("pytorch-metric-learning TripletMarginLoss(0.2) + BatchHardMiner", "pml_triplet"),
}


#: PDDMLoss's defaults when docs/losses.json was measured: the paper's setting
PAPER = {**PAPER_SETTING, "miner": HardQuadrupletMiner("hardest")}


def criterion_for(spec):
    if spec == "pml_ms":
        from pytorch_metric_learning import losses, miners

        loss, miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()
        return lambda e, y: loss(e, y, miner(e, y))
    if spec == "pml_triplet":
        from pytorch_metric_learning import losses, miners

        loss, miner = losses.TripletMarginLoss(margin=0.2), miners.BatchHardMiner()
        return lambda e, y: loss(e, y, miner(e, y))
    return PDDMLoss(DIM, **(PAPER | spec))


def run_one(args) -> dict:
    name, steps, seed = args
    torch.set_num_threads(1)
    glyphs = load_glyphs()
    train, test = glyphs.split(0.5, seed=0)
    torch.manual_seed(seed)
    model = SmallCNN(DIM)
    start = time.perf_counter()
    res = fit_in_memory(model, criterion_for(VARIANTS[name][1]), train.images, train.labels, test.images,
                        test.labels, steps=steps, seed=seed, progress=False, log_every=max(1, steps // 10))  # fmt: skip
    last = res.history[-1]
    return {
        "name": name,
        "before": res.recall_before,
        "after": res.recall_after,
        "seconds": time.perf_counter() - start,
        "final_loss": last["loss"],
        "spread": last.get("spread"),
        "history": res.history,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="*", choices=sorted(VARIANTS), help="run these variants only")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args()
    names = args.only or list(VARIANTS)
    glyphs = load_glyphs()  # render once (cached) before the workers start
    _, test = glyphs.split(0.5, seed=0)
    raw = recall_at_k(test.images.reshape(len(test), -1).astype(np.float32), test.labels)
    print(f"{len(glyphs.class_names)} fonts; held-out test: {len(test.class_names)} fonts, {len(test)} images")
    print(f"raw pixels: R@1 {raw[1]:.3f}", flush=True)
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        results = []
        for r in pool.imap(run_one, [(n, args.steps, args.seed) for n in names]):
            print(
                f"{r['name']:>18}: R@1 {r['before'][1]:.3f} -> {r['after'][1]:.3f} ({r['seconds']:.0f} s)", flush=True
            )
            results.append(r)
    print(f"\n| criterion | R@1 untrained | R@1 after {args.steps} steps | R@2 | R@4 | R@8 | final loss | spread |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| raw pixels (no training) | - | {raw[1]:.3f} | {raw[2]:.3f} | {raw[4]:.3f} | {raw[8]:.3f} | - | - |")
    for r in results:
        a = r["after"]
        spread = "-" if r["spread"] is None else f"{r['spread']:.2f}"
        print(f"| {VARIANTS[r['name']][0]} | {r['before'][1]:.3f} | **{a[1]:.3f}** | {a[2]:.3f} | {a[4]:.3f} "
              f"| {a[8]:.3f} | {r['final_loss']:.3f} | {spread} |")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"raw": raw, "steps": args.steps, "results": results}, indent=1))


if __name__ == "__main__":
    main()
