"""The quality study: PDDMLoss variants beside pytorch-metric-learning losses, held-out classes, same everything.

Same network (SmallCNN 32-64-128-128 with batch norm, from random init, 128-d), data (fonts-aenigma glyphs,
32 px, train / test fonts disjoint, 4-px pad-and-crop), P x K batches (16 x 4), optimiser (AdamW 1e-3, weight
decay 1e-4, cosine to zero) and steps for every row; only the criterion differs. Held-out Recall@1/2/4/8 and
MAP@R (``distpddm.retrieval``) at the ``--curve`` steps; for PDDM rows also re-ranking of the top 8 by the
learned metric and the separation (ROC AUC) of positive and negative pair similarities under the learned
metric and under Euclidean distance. One training at a time (one thread); every finished run is appended to
``--out`` (JSON lines) at once, so a stopped study keeps what it has and a rerun skips what is done::

    python experiments/quality.py run --rows pml_ms pddm_shipped --seeds 0 1 2 [--steps 1000]
    python experiments/quality.py table      # mean +- spread over seeds, markdown
    python experiments/quality.py table --csv experiments/results/quality.csv   # and every group, as CSV
    python experiments/quality.py plot experiments/results/quality_scratch.png --rows pml_ms pddm_allpos_b01
    python experiments/quality.py plot-separation experiments/results/separation.png --rows pml_ms pddm_allpos_b01
    python experiments/quality.py run --protocol lite0 --rows pml_ms ... --steps 300   # from ImageNet weights

An experiment, not part of the product: it imports the installed ``distpddm`` as any user would.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from distpddm import (
    AvgNonZeroReducer,
    BatchHardestQuadrupletMiner,
    CrossBatchMemory,
    HardQuadrupletMiner,
    MeanReducer,
    PDDMLoss,
    SemiHardQuadrupletMiner,
)
from distpddm.data.glyphs import GlyphSet, load_glyphs
from distpddm.evaluate import embed
from distpddm.loss import PAPER_SETTING
from distpddm.model import SmallCNN
from distpddm.retrieval import retrieval_metrics
from distpddm.train.inmemory import fit_in_memory, images_to_tensor

DIM = 128
OUT = Path(__file__).resolve().parent / "results" / "quality.jsonl"
#: the from-scratch setting before this study (configs/fonts.yaml until then): hardest positive per anchor
HARDEST = {"alpha": 0.1, "beta": 0.2, "lam": 0.5, "metric_grad": False}
#: the study's winner (configs/fonts.yaml's loss until the protocol chose on validation): every positive, beta .1
SHIPPED = HARDEST | {"positives": "all", "beta": 0.1}
ALL = HARDEST | {"positives": "all"}

#: name -> (description, PDDMLoss kwargs, or the name of a pytorch-metric-learning recipe)
ROWS: dict[str, tuple[str, dict | str]] = {
    "pml_triplet": ("PML TripletMarginLoss(0.2) + BatchHardMiner", "pml_triplet"),
    "pml_ms": ("PML MultiSimilarityLoss + MultiSimilarityMiner", "pml_ms"),
    "pml_contrastive": ("PML ContrastiveLoss (defaults)", "pml_contrastive"),
    # the shipped setting and what mines for it
    "pddm_allpos_b01": ("**PDDM shipped**: every positive per anchor, a .1, b .1, metric_grad off", SHIPPED),
    "euclid_allpos_b01": ("shipped loss, Euclidean mining", SHIPPED | {"metric": "euclidean"}),
    "mahal_allpos_b01": ("shipped loss, Mahalanobis mining", SHIPPED | {"metric": "mahalanobis"}),
    "pddm_allpos_em_only": (
        "shipped mining, E_m only into the embedding (lam 0, metric_grad on)",
        SHIPPED | {"lam": 0.0, "metric_grad": True},
    ),
    "pddm_allpos_both": (
        "shipped, E_m and E_e both into the embedding (metric_grad on)",
        SHIPPED | {"metric_grad": True},
    ),
    # variants of the shipped setting
    "pddm_allpos": ("every positive, b .2", ALL),
    "pddm_allpos_b005": ("every positive, b .05", ALL | {"beta": 0.05}),
    "pddm_allpos_b03": ("every positive, b .3", ALL | {"beta": 0.3}),
    "pddm_allpos_a02": ("every positive, a .2, b .1", SHIPPED | {"alpha": 0.2}),
    "pddm_allpos_neg2": ("every positive x 2 hardest negatives, b .2", ALL | {"negatives": 2}),
    "pddm_allpos_neg4": ("every positive x 4 hardest negatives, b .2", ALL | {"negatives": 4}),
    "pddm_allpos_soft": ("every positive, soft hinge t .1, b .2", ALL | {"soft": 0.1}),
    "pddm_allpos_sq": ("every positive, squared distance, b .2", ALL | {"distance": "squared"}),
    "pddm_allpos_mg500": ("every positive, b .2, metric_grad on after step 500", ALL | {"metric_grad_after": 500}),
    "pddm_allpos_hlr10": ("every positive, b .1, PDDM unit at 10 x the rate", SHIPPED | {"_head_lr": 1e-2}),
    "pddm_allpos_xbm": ("every positive, b .1, cross-batch memory 1024", SHIPPED | {"memory": 1024}),
    "euclid_allpos": ("every positive, b .2, Euclidean mining", ALL | {"metric": "euclidean"}),
    "pddm_allpos_nz": (
        "every positive, b .1, each header over its non-zero quadruplets",
        SHIPPED | {"reduction": "nonzero"},
    ),
    "pddm_allpos_semi": (
        "every positive, b .1, semi-hard negatives (best-scored below S_ij, else the least similar)",
        SHIPPED | {"semihard": True},
    ),
    "pddm_allpos_nz_b02": ("every positive, b .2, non-zero reduction", ALL | {"reduction": "nonzero"}),
    "pddm_allpos_nz_neg4": (
        "every positive x 4 hardest negatives, b .1, non-zero reduction",
        SHIPPED | {"reduction": "nonzero", "negatives": 4},
    ),
    "pddm_allpos_nz_lam1": (
        "every positive, b .1, lam 1, non-zero reduction",
        SHIPPED | {"reduction": "nonzero", "lam": 1.0},
    ),
    # the hardest-positive setting shipped before, and its variants
    "pddm_shipped": ("PDDM hardest positive per anchor (shipped before), a .1, b .2, metric_grad off", HARDEST),
    "pddm_batch": ("PDDM one quadruplet per batch (the paper's form), a .1, b .2", HARDEST | {"mode": "batch"}),
    "pddm_defaults": ("PDDM loss defaults (a .5, b 1, lam .5, metric_grad on)", {}),
    "pddm_neg4": ("hardest positive x 4 hardest negatives", HARDEST | {"negatives": 4}),
    "pddm_mg250": ("hardest positive, metric_grad on after step 250", HARDEST | {"metric_grad_after": 250}),
    "pddm_mg500": ("hardest positive, metric_grad on after step 500", HARDEST | {"metric_grad_after": 500}),
    "pddm_xbm": ("hardest positive + cross-batch memory 1024 (after 100 steps)", HARDEST | {"memory": 1024}),
    "pddm_xbm4k": ("hardest positive + cross-batch memory 4096 (after 100 steps)", HARDEST | {"memory": 4096}),
    "pddm_b04": ("hardest positive, b .4", HARDEST | {"beta": 0.4}),
    "pddm_lam1": ("hardest positive, lam 1", HARDEST | {"lam": 1.0}),
    "euclid_shipped": ("hardest positive, Euclidean mining", HARDEST | {"metric": "euclidean"}),
    "mahal_shipped": ("hardest positive, Mahalanobis mining", HARDEST | {"metric": "mahalanobis"}),
    "pddm_em_only": ("hardest positive, E_m only (lam 0, metric_grad on)", {"alpha": 0.1, "beta": 0.2, "lam": 0.0}),
    "pddm_both": ("hardest positive, E_m + E_e both into the embedding (metric_grad on)", {"alpha": 0.1, "beta": 0.2}),
}
MEMORY_WARMUP = 100


def criterion_for(spec):
    if isinstance(spec, str):
        from pytorch_metric_learning import losses, miners

        loss, miner = {
            "pml_ms": (losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()),
            "pml_triplet": (losses.TripletMarginLoss(margin=0.2), miners.BatchHardMiner()),
            "pml_contrastive": (losses.ContrastiveLoss(), None),
        }[spec]
        return lambda e, y: loss(e, y, miner(e, y)) if miner is not None else loss(e, y)
    spec = {k: v for k, v in spec.items() if not k.startswith("_")}  # "_head_lr": a training option
    # The rows name the study's options as flags (as recorded); here they become the parts they stand for.
    positives, negatives = spec.pop("positives", "hardest"), spec.pop("negatives", 1)
    if spec.pop("semihard", False):
        miner = SemiHardQuadrupletMiner(positives)
    elif spec.pop("mode", "anchor") == "batch":
        miner = BatchHardestQuadrupletMiner()
    else:
        miner = HardQuadrupletMiner(positives, negatives)
    reducer = AvgNonZeroReducer() if spec.pop("reduction", "mean") == "nonzero" else MeanReducer()
    memory = spec.pop("memory", 0)
    loss = PDDMLoss(DIM, miner=miner, reducer=reducer, **(PAPER_SETTING | spec))  # the defaults when it ran
    return CrossBatchMemory(loss, memory, MEMORY_WARMUP) if memory else loss


def pad_crop(pad: int):
    """Random ``pad``-pixel translation per image (the background, -1, fills the border)."""

    def augment(x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0)
        dy, dx = torch.randint(0, 2 * pad + 1, (2, n)).to(x.device)  # one indexing op, not one per image (GPU)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]
        return padded[torch.arange(n, device=x.device)[:, None, None], :, rows, cols].permute(0, 3, 1, 2).contiguous()

    return augment


HIST_BINS = 40


def separation(sims: dict) -> dict:
    """ROC AUC of positive over negative pair similarities (1 = perfectly separated, .5 = chance), their
    means, and both histograms on shared bins (what ``plot-separation`` draws)."""
    from sklearn.metrics import roc_auc_score

    out = {}
    for name, d in sims.items():
        y = np.r_[np.ones(len(d["positive"])), np.zeros(len(d["negative"]))]
        out[name] = float(roc_auc_score(y, np.r_[d["positive"], d["negative"]]))
        out[f"{name} mean pos/neg"] = [float(d["positive"].mean()), float(d["negative"].mean())]
        # float64: numpy bins in the data's dtype, and float32 scores spanning a few ulps cannot hold 40 bins
        p, n = np.asarray(d["positive"], np.float64), np.asarray(d["negative"], np.float64)
        both = np.r_[p, n]
        pos, edges = np.histogram(p, bins=HIST_BINS, range=(float(both.min()), float(both.max())))
        out[f"{name} histogram"] = {
            "edges": edges.tolist(),
            "positive": pos.tolist(),
            "negative": np.histogram(n, bins=edges)[0].tolist(),
        }
    return out


#: protocol -> (glyph size, pad-and-crop pixels, rates); "lite0" fine-tunes the packaged ImageNet weights the
#: paper's way: pretrained backbone at a tenth of the new embedding layer's rate, frozen batch norm. "scratch64"
#: is the issue's own harness (64 px, 4-px pad-and-crop, blocks 32-64-128-256); "scratch" shrinks it for a CPU.
_SCRATCH = {"size": 32, "pad": 4, "lr": 1e-3, "backbone_lr": None, "widths": (32, 64, 128, 128)}
PROTOCOLS = {
    "scratch": _SCRATCH,
    "scratch64": _SCRATCH | {"size": 64, "widths": (32, 64, 128, 256)},
    # the two halves of the difference between "scratch" and "scratch64": which one flips the order?
    "scratch_w256": _SCRATCH | {"widths": (32, 64, 128, 256)},
    "scratch64_w128": _SCRATCH | {"size": 64},
    "lite0": {"size": 64, "pad": 8, "lr": 1e-3, "backbone_lr": 1e-4},
    # a diagnostic, not a setting: 32 px trained without the quarter of training fonts raw pixels find hardest
    "scratch_drop25": _SCRATCH | {"drop_hardest": 0.25},
}


def make_model(protocol: str) -> torch.nn.Module:
    if "widths" in PROTOCOLS[protocol]:
        return SmallCNN(DIM, in_channels=1, widths=PROTOCOLS[protocol]["widths"])
    from distpddm.config import ModelConfig
    from distpddm.model import create_model

    cfg = ModelConfig(backbone="efficientnet_lite0", pretrained=True, embed_dim=DIM, freeze_bn=True, in_channels=1)
    return create_model(cfg)


def glyph_set(size: int, glyphs: str | None) -> GlyphSet:
    """The fonts' glyphs: rendered (or read from the cache), or from ``glyphs`` (an ``.npz`` written by
    ``save`` below, ``{size}`` filled in) where the fonts are not installed (the GPU machine)."""
    return load_glyphs(size=size) if glyphs is None else GlyphSet.load(glyphs.format(size=size))


def training_fonts(train: GlyphSet, share: float) -> GlyphSet:
    """``train`` less the ``share`` of its fonts that raw pixels find hardest (lowest raw-pixel Recall@1 among
    the training images): does a criterion's deficit come from what it learns on those fonts?"""
    if not share:
        return train
    from diagnose import raw_difficulty

    classes = np.arange(len(train.class_names))
    raw = raw_difficulty(train.images, train.labels, classes)
    return train.classes(np.sort(np.argsort(raw, kind="stable")[int(round(share * len(classes))) :]))


def fonts(protocol: str, glyphs: str | None) -> tuple[GlyphSet, GlyphSet]:
    """The protocol's (training, held-out) fonts: the study's one split, less any fonts the protocol drops."""
    train, test = glyph_set(PROTOCOLS[protocol]["size"], glyphs).split(0.5, seed=0)
    return training_fonts(train, PROTOCOLS[protocol].get("drop_hardest", 0.0)), test


def run_one(
    name: str, seed: int, steps: int, curve_at: tuple[int, ...], protocol: str = "scratch", device: str = "cpu",
    glyphs: str | None = None, threads: int = 1, save_embeddings: Path | None = None,
) -> dict:  # fmt: skip
    from distpddm.rerank import pair_similarities, rerank

    torch.set_num_threads(threads)
    proto = PROTOCOLS[protocol]
    train, test = fonts(protocol, glyphs)
    x_test = images_to_tensor(test.images)
    torch.manual_seed(seed)
    model = make_model(protocol)
    spec = ROWS[name][1]
    criterion = criterion_for(spec)

    last = {}  # the latest test embedding: the final one serves the re-ranking and separation too

    def evaluate(m) -> dict:
        last["emb"] = embed(m, x_test)
        f = retrieval_metrics(last["emb"], test.labels, (1, 2, 4, 8))
        return {k: float(f[k]) for k in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")}

    start = time.perf_counter()
    res = fit_in_memory(
        model, criterion, train.images, train.labels, test.images, test.labels, steps=steps, seed=seed,
        progress=False, log_every=max(1, steps // 20), cosine=True, augment=pad_crop(proto["pad"]),
        eval_at=curve_at, evaluate=evaluate, recall_before=False, recall_after=False, lr=proto["lr"],
        backbone_lr=proto["backbone_lr"], head_lr=spec.get("_head_lr") if isinstance(spec, dict) else None,
        weight_decay=1e-4, device=device,
    )  # fmt: skip
    out = {"name": name, "seed": seed, "steps": steps, "protocol": protocol, "seconds": time.perf_counter() - start}
    out["device"] = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    out["curve"] = {str(s): v for s, v in res.curve.items()}
    out["final"] = res.curve.get(steps) or evaluate(model)
    out["history"] = res.history
    emb = last["emb"]
    if save_embeddings is not None:  # for diagnose.py: held-out and training fonts, final model, no augmentation
        path = Path(save_embeddings) / embeddings_name(protocol, name, seed, steps)
        path.parent.mkdir(parents=True, exist_ok=True)
        train_emb = embed(model, images_to_tensor(train.images))
        np.savez_compressed(path, test=emb, test_labels=test.labels, train=train_emb, train_labels=train.labels)
    loss = criterion.loss if isinstance(criterion, CrossBatchMemory) else criterion
    if isinstance(loss, PDDMLoss):
        scorer = None if loss.metric == "euclidean" else loss.scorer
        if scorer is not None:
            out["rerank"] = rerank(emb, test.labels, scorer, top_n=8)
        out["separation"] = separation(pair_similarities(emb, test.labels, scorer))
    else:
        out["separation"] = separation(pair_similarities(emb, test.labels, None))
    return out


def embeddings_name(protocol: str, name: str, seed: int, steps: int) -> str:
    return f"{protocol}_{name}_s{seed}_{steps}.npz"


def done(path: Path) -> set[tuple[str, int, int]]:
    if not path.exists():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["name"], r["seed"], r["steps"], r.get("protocol", "scratch")) for r in rows}


def cmd_run(args) -> None:
    curve_at = tuple(sorted({s for s in args.curve if s < args.steps} | {args.steps}))
    finished = done(args.out)
    # every row's first seed before any row's second: partial studies stay comparable
    jobs = [(n, s) for s in args.seeds for n in args.rows if (n, s, args.steps, args.protocol) not in finished]
    opts = {"protocol": args.protocol, "device": args.device, "glyphs": args.glyphs, "threads": args.threads,
            "save_embeddings": args.save_embeddings}  # fmt: skip
    start = time.monotonic()
    failed: list[tuple[str, int, BaseException]] = []

    def record(r: dict) -> None:  # the parent alone writes --out, as each run ends
        with args.out.open("a") as f:
            f.write(json.dumps(r) + "\n")
        c = " ".join(f"{s}:{v['recall@1']:.3f}" for s, v in r["curve"].items())
        print(
            f"{r['name']:>16} seed {r['seed']}: R@1 {c}  MAP@R {r['final']['map@r']:.3f}  ({r['seconds']:.0f} s)",
            flush=True,
        )

    def late() -> bool:
        return args.start_within is not None and time.monotonic() - start > args.start_within

    if args.workers == 1:
        for n, s in jobs:
            if late():
                break
            try:
                record(run_one(n, s, args.steps, curve_at, **opts))
            except Exception as e:  # one broken row costs that row, not the study
                failed.append((n, s, e))
    else:  # several trainings at once (one GPU has room for many small ones); spawn: CUDA cannot fork
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        with ProcessPoolExecutor(args.workers, mp_context=mp.get_context("spawn")) as pool:
            todo, running, futures = list(jobs), set(), {}
            while todo or running:
                try:
                    while todo and len(running) < args.workers and not late():
                        n, s = todo.pop(0)
                        fut = pool.submit(run_one, n, s, args.steps, curve_at, **opts)
                        futures[fut] = (n, s)
                        running.add(fut)
                except BrokenProcessPool as e:  # a worker died (killed, out of memory): no new starts
                    failed += [(n, s, e) for n, s in [(n, s), *todo]]
                    todo = []
                if not running:
                    break
                finished_now, running = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished_now:
                    try:
                        record(fut.result())
                    except Exception as e:  # the row's own error, or BrokenProcessPool for every row in flight
                        failed.append((*futures[fut], e))
    for n, s, e in failed:
        print(f"FAILED {n} seed {s}: {type(e).__name__}: {e}", flush=True)
    tried = {(n, s) for n, s, _ in failed}
    left = [j for j in jobs if (*j, args.steps, args.protocol) not in done(args.out) and j not in tried]
    if left:
        print(f"not started (--start-within {args.start_within} s passed): {left}", flush=True)
    if failed:
        sys.exit(1)


def _ms(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f}"


def _records(args) -> tuple[list[dict], list[str]]:
    """The recorded runs of one protocol and budget, and their row names in ROWS' order."""
    rows = [json.loads(line) for line in args.out.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["steps"] == args.steps and r.get("protocol", "scratch") == args.protocol]
    names = [n for n in ROWS if any(r["name"] == n for r in rows)]
    return rows, names


def _seed_count(rs: list[dict], steps: list[int]) -> str:
    """How many seeds each point of a row averages: "3 seeds", or "1-3 seeds" where some runs lack a step."""
    counts = sorted({sum(str(s) in r["curve"] for r in rs) for s in steps})
    n = f"{counts[0]}-{counts[-1]}" if len(counts) > 1 else f"{counts[0]}"
    return f"{n} seed{'' if n == '1' else 's'}"


def cmd_plot(args) -> None:
    """Held-out Recall@1 and MAP@R against training step, mean over seeds with a +- one-spread band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, names = _records(args)
    names = [n for n in names if not args.rows or n in args.rows]
    if not names:
        sys.exit(f"no runs of {args.rows or 'any row'} at {args.steps} steps, protocol {args.protocol}")
    fig = Figure(figsize=(11, 4.2 + 0.22 * len(names)), layout="constrained")
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for n in names:
        rs = [r for r in rows if r["name"] == n]
        steps = sorted({int(s) for r in rs for s in r["curve"]})
        label = f"{ROWS[n][0].replace('**', '')} ({_seed_count(rs, steps)})"
        for ax, key in zip(axes, ("recall@1", "map@r"), strict=True):
            v = [[r["curve"][str(s)][key] for r in rs if str(s) in r["curve"]] for s in steps]
            mean = np.array([np.mean(x) for x in v])
            sd = np.array([np.std(x, ddof=1) if len(x) > 1 else 0.0 for x in v])
            (line,) = ax.plot(steps, mean, marker="o", label=label if key == "recall@1" else None)
            ax.fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.15, linewidth=0)
    for ax, title in zip(axes, ("held-out Recall@1", "held-out MAP@R"), strict=True):
        ax.set_xlabel("training step")
        ax.set_title(f"{title} ({args.protocol}, band: ± 1 seed s.d.)")
        ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    args.png.parent.mkdir(parents=True, exist_ok=True)
    canvas.print_png(str(args.png))
    print(f"wrote {args.png}")


def _histograms(record: dict) -> list[tuple[str, dict, float]]:
    """``(metric, histogram, AUC)`` of a run, Euclidean first; the Euclidean one as a distance (higher =
    farther), as people read it, not the negative distance the AUC is computed on."""
    sep, out = record.get("separation", {}), []
    for key, h in sep.items():
        if not key.endswith(" histogram"):
            continue
        metric = key.removesuffix(" histogram")
        if metric == "negative Euclidean distance":
            h = {"edges": [-e for e in h["edges"][::-1]], "positive": h["positive"][::-1],
                 "negative": h["negative"][::-1]}  # fmt: skip
            out.insert(0, ("Euclidean distance", h, sep[metric]))
        else:
            out.append((metric, h, sep[metric]))
    return out


def _short(name: str) -> str:
    """A row's description up to its first colon (``PDDM shipped``), or its key where that is long."""
    desc = ROWS[name][0].replace("**", "").split(":")[0]
    return desc if len(desc) <= 60 else name


def cmd_plot_separation(args) -> None:
    """Held-out positive and negative pair similarities of one seed per row: under Euclidean distance and,
    for PDDM rows, under the learned metric (the paper's question: does the learned metric separate better?)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    rows, names = _records(args)
    names = [n for n in names if not args.rows or n in args.rows]
    runs = {}
    for n in names:
        rs = sorted((r for r in rows if r["name"] == n and _histograms(r)), key=lambda r: r["seed"])
        rs = [r for r in rs if args.seed is None or r["seed"] == args.seed]
        if rs:
            runs[n] = rs[0]
    if not runs:
        sys.exit(
            f"no runs of {args.rows or 'any row'} at {args.steps} steps, protocol {args.protocol}"
            + (f", seed {args.seed}" if args.seed is not None else "")
            + " with recorded histograms (runs recorded before they were added have none)"
        )
    fig = separation_figure(runs, f"held-out pair similarities ({args.protocol}, {args.steps} steps)")
    args.png.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(args.png))
    print(f"wrote {args.png}")


def separation_figure(runs: dict[str, dict], title: str):
    """One panel row per criterion (row name -> its run record): each metric's positive and negative
    histograms as densities, Euclidean first."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 2.6 * len(runs)), layout="constrained")
    axes = fig.subplots(len(runs), 2, squeeze=False)
    for (n, r), ax_row in zip(runs.items(), axes, strict=True):
        hists = _histograms(r)
        for ax, (metric, h, auc) in zip(ax_row, hists, strict=False):
            edges = np.asarray(h["edges"])
            for kind, colour in (("positive", "C0"), ("negative", "C1")):
                counts = np.asarray(h[kind], dtype=float)
                density = counts / max(counts.sum(), 1.0) / np.diff(edges)
                ax.stairs(density, edges, fill=True, alpha=0.45, color=colour, label=f"{kind} pairs")
            ax.set_title(f"{_short(n)}\n{metric}, AUC {auc:.3f} (seed {r['seed']})", fontsize=8)
            distance = metric == "Euclidean distance"
            ax.set_xlabel(
                "distance (lower = more similar)" if distance else "score (higher = more similar)", fontsize=7
            )
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=7)
        for ax in ax_row[len(hists) :]:
            ax.set_axis_off()
    fig.suptitle(title)
    return fig


def cmd_table(args) -> None:
    rows, names = _records(args)
    keys = ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")
    print(
        f"| criterion ({args.steps} steps) | seeds | R@1 | R@2 | R@4 | R@8 | MAP@R | R@1 curve | AUC Eucl. / learned"
        " | distance pos / neg |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in names:
        rs = [r for r in rows if r["name"] == n]
        cells = [_ms([r["final"][k] for r in rs]) for k in keys]
        steps = sorted({int(s) for r in rs for s in r["curve"]})
        curve = " / ".join(f"{np.mean([r['curve'][str(s)]['recall@1'] for r in rs if str(s) in r['curve']]):.3f}"
                           for s in steps)  # fmt: skip
        auc_e = np.mean([r["separation"]["negative Euclidean distance"] for r in rs])
        learned = [v for r in rs for k, v in r["separation"].items() if k.endswith("score")]
        auc = f"{auc_e:.3f}" + (f" / {np.mean(learned):.3f}" if learned else "")
        pos, neg = np.mean([r["separation"]["negative Euclidean distance mean pos/neg"] for r in rs], axis=0)
        dist = f"{-pos:.2f} / {-neg:.2f}"
        print(f"| {ROWS[n][0]} | {len(rs)} | " + " | ".join(cells) + f" | {curve} | {auc} | {dist} |")
    rr = [r for r in rows if "rerank" in r]
    if rr:
        print("\n| criterion | Euclidean R@1 of the top 8 | re-ranked by the learned metric |\n|---|---|---|")
        for n in names:
            rs = [r for r in rr if r["name"] == n]
            if rs:
                e = _ms([r["rerank"]["rerank@8/euclidean_recall@1"] for r in rs])
                print(f"| {ROWS[n][0]} | {e} | {_ms([r['rerank']['rerank@8/recall@1'] for r in rs])} |")
    if args.csv is not None:
        write_csv(args.out, args.csv)


#: the compact table's columns: one line per protocol x budget x row of a records file
CSV_COLUMNS = ("protocol", "steps", "row", "description", "seeds", "seed_list", "recall@1_mean", "recall@1_sd",
               "map@r_mean", "map@r_sd")  # fmt: skip


def csv_rows(records: list[dict]) -> list[dict]:
    """Every protocol x budget x row of ``records``: its seeds, and the mean and s.d. over seeds (ddof 1, empty
    for one seed) of the final held-out Recall@1 and MAP@R, to 3 decimals as the markdown table prints them.
    Ordered by protocol and row as PROTOCOLS and ROWS list them, then by steps."""
    groups: dict[tuple[str, int, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r.get("protocol", "scratch"), r["steps"], r["name"]), []).append(r)
    protocols, names = list(PROTOCOLS), list(ROWS)

    def order(key):
        protocol, steps, name = key
        return (protocols.index(protocol) if protocol in protocols else len(protocols), protocol, steps,
                names.index(name) if name in names else len(names), name)  # fmt: skip

    out = []
    for key in sorted(groups, key=order):
        protocol, steps, name = key
        rs = sorted(groups[key], key=lambda r: r["seed"])
        line = {"protocol": protocol, "steps": steps, "row": name,
                "description": ROWS[name][0].replace("**", "") if name in ROWS else "", "seeds": len(rs),
                "seed_list": " ".join(str(r["seed"]) for r in rs)}  # fmt: skip
        for k in ("recall@1", "map@r"):
            v = [r["final"][k] for r in rs]
            line[f"{k}_mean"] = f"{np.mean(v):.3f}"
            line[f"{k}_sd"] = f"{np.std(v, ddof=1):.3f}" if len(v) > 1 else ""
        out.append(line)
    return out


def write_csv(records_path: Path, csv_path: Path) -> None:
    records = [json.loads(line) for line in records_path.read_text().splitlines() if line.strip()]
    rows = csv_rows(records)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {csv_path}: {len(rows)} protocol x steps x row groups of {len(records)} runs", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--rows", nargs="+", choices=sorted(ROWS), required=True)
    run.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    run.add_argument("--steps", type=int, default=1000)
    run.add_argument("--curve", nargs="*", type=int, default=[250, 500])
    run.add_argument("--threads", type=int, default=1, help="torch threads per training")
    run.add_argument("--workers", type=int, default=1, help="trainings at once (processes)")
    run.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1...")
    run.add_argument("--glyphs", help="an .npz of the glyphs ({size} filled in; `save` writes them) instead of fonts")
    run.add_argument("--start-within", type=float, help="start no training after this many seconds")
    run.add_argument(
        "--save-embeddings", type=Path, metavar="DIR",
        help="also write each run's final held-out and training-font embeddings to DIR (experiments/diagnose.py)",
    )  # fmt: skip
    save = sub.add_parser("save", help="write the rendered glyphs of every protocol's size to DIR (for --glyphs)")
    save.add_argument("dir", type=Path)
    table = sub.add_parser("table", help="markdown of one protocol and budget (and --csv: every one, as CSV)")
    table.add_argument("--steps", type=int, default=1000)
    table.add_argument(
        "--csv", type=Path, metavar="FILE",
        help="also write every protocol x steps x row of --out to FILE: seeds, mean and s.d. of R@1 and MAP@R",
    )  # fmt: skip
    plot = sub.add_parser("plot", help="Recall@1 and MAP@R against step, as a PNG")
    plot.add_argument("png", type=Path)
    plot.add_argument("--steps", type=int, default=1000)
    plot.add_argument("--rows", nargs="+", choices=sorted(ROWS), help="default: every row with runs")
    sep = sub.add_parser("plot-separation", help="positive / negative pair similarity histograms, as a PNG")
    sep.add_argument("png", type=Path)
    sep.add_argument("--steps", type=int, default=1000)
    sep.add_argument("--rows", nargs="+", choices=sorted(ROWS), help="default: every row with histograms")
    sep.add_argument("--seed", type=int, help="default: each row's lowest seed with histograms")
    for q in (run, table, plot, sep):
        q.add_argument("--out", type=Path, default=OUT)
        q.add_argument("--protocol", choices=sorted(PROTOCOLS), default="scratch", help="see PROTOCOLS")
    args = p.parse_args()
    {"run": cmd_run, "table": cmd_table, "plot": cmd_plot, "plot-separation": cmd_plot_separation, "save": cmd_save}[
        args.cmd
    ](args)


def cmd_save(args) -> None:
    args.dir.mkdir(parents=True, exist_ok=True)
    for size in sorted({p["size"] for p in PROTOCOLS.values()}):
        g = load_glyphs(size=size)
        path = args.dir / f"glyphs-{size}px.npz"
        g.save(path)
        print(f"{path}: {len(g.labels)} images of {len(g.class_names)} fonts")


if __name__ == "__main__":
    main()
