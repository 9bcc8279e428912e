"""Why a method stalls or collapses, from what the product's own runs leave behind (validation classes only):

* **training** (each run's ``metrics.jsonl``): per quarter of the steps, the embedding's spread, the share of
  active hinges, the mined positive and negative scores of the PDDM unit and E_m against its collapsed value
  ``2 alpha``, and how many logged steps the trainer marked ``metric_collapsed``;
* **hardest pairs** (the embeddings ``distpddm eval`` saved for the run's validation classes): per query its
  farthest positive and nearest negative by Euclidean distance, how often the positive is the nearer, the gap
  against the run's embedding margin beta (PDDM) and, for a learned metric, how often the PDDM unit scores the
  positive above the negative on those same pairs;
* **class size**: Recall@1 of the queries of small and large validation classes;
* **training classes**: Recall@1 and MAP@R on the split trained on, where ``distpddm eval RUN --shards <train>
  --out RUN/eval-protocol-train`` was run (does the method fit its training classes and fail to transfer?).

    python experiments/protocol/why.py table experiments/protocol/results/clipart_scratch.jsonl [--json F]
    python experiments/protocol/why.py plot experiments/protocol/results/clipart_scratch.jsonl OUT.png

Reads ``split == "val"`` records only. An experiment, not part of the product: it imports the installed
``distpddm`` as any user would.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from distpddm.evaluate import SOURCE
from distpddm.extract import LABELS, load_embeddings
from distpddm.model import load_exported_metric
from distpddm.retrieval import search

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import read_records  # noqa: E402  -- a missing file reads as no records

QUARTERS = 4


def _active_key(row: dict) -> str | None:
    """The share of active hinges a loss logs: PDDM's E_e, or a pair loss's (``<name>_active``)."""
    if "active_embedding" in row:
        return "active_embedding"
    return next((k for k in sorted(row) if k.endswith("_active")), None)


def training(rows: list[dict], alpha: float | None) -> list[dict]:
    """Per quarter of the logged training steps: the means of what the loss logged."""
    steps = [r for r in rows if r.get("step", 0) > 0 and "loss" in r]
    if not steps:
        return []
    last = max(r["step"] for r in steps)
    out = []
    for q in range(QUARTERS):
        lo, hi = q * last / QUARTERS, (q + 1) * last / QUARTERS
        part = [r for r in steps if lo < r["step"] <= hi]
        if not part:
            continue

        def mean(key: str, part=part) -> float | None:
            values = [float(r[key]) for r in part if key in r]
            return float(np.mean(values)) if values else None

        active = _active_key(part[0])
        row = {"steps": f"{int(lo) + 1}-{int(hi)}", "loss": mean("loss"), "spread": mean("spread")}
        row["active"] = mean(active) if active else None
        row["mined"] = mean("quadruplets") if "quadruplets" in part[0] else mean("tuples")  # per worker's batch
        row["data_used"] = mean("data_used")  # the share of an epoch's samples the batcher placed in batches
        if "pos_score" in part[0]:
            row |= {"pos_score": mean("pos_score"), "neg_score": mean("neg_score")}
            row["active_metric"] = mean("active_metric")
            if alpha:
                row["metric_loss_over_2alpha"] = mean("metric_loss") / (2 * alpha)
            row["collapsed_steps"] = int(sum(bool(r.get("metric_collapsed")) for r in part))
            row["logged_steps"] = len(part)
        out.append(row)
    return out


def hardest_pairs(emb: np.ndarray, labels: np.ndarray, scorer=None, beta: float | None = None) -> dict:
    """Per query (a class with another member): its farthest positive and nearest negative (Euclidean, on
    L2-normalised rows as the losses see them)."""
    x = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    queries = np.flatnonzero(counts[inverse] > 1)
    d = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * x[queries] @ x.T))  # (Q, N): unit rows
    d[np.arange(len(queries)), queries] = np.nan
    same = labels[queries][:, None] == labels[None, :]
    pos = np.nanargmax(np.where(same, d, -np.inf), axis=1)
    neg = np.nanargmin(np.where(same, np.inf, d), axis=1)
    d_pos, d_neg = d[np.arange(len(queries)), pos], d[np.arange(len(queries)), neg]
    gap = d_neg - d_pos
    out = {
        "queries": int(len(queries)),
        "hardest_positive_distance": float(np.mean(d_pos)),
        "hardest_negative_distance": float(np.mean(d_neg)),
        "positive_nearer": float(np.mean(gap > 0)),
        "median_gap": float(np.median(gap)),
    }
    if beta is not None:
        out["gap_above_beta"] = float(np.mean(gap > beta))  # E_e's hinge at rest on this pair
    if scorer is not None:
        with torch.no_grad():
            a = torch.from_numpy(x[queries]).float()
            s_pos = scorer(a, torch.from_numpy(x[pos]).float()).reshape(-1).numpy()
            s_neg = scorer(a, torch.from_numpy(x[neg]).float()).reshape(-1).numpy()
        out |= {
            "metric_positive_score": float(np.mean(s_pos)),
            "metric_negative_score": float(np.mean(s_neg)),
            "metric_positive_higher": float(np.mean(s_pos > s_neg)),
        }
    return out


def recall_by_class_size(emb: np.ndarray, labels: np.ndarray, edges=(20, 40)) -> dict:
    """Recall@1 of the queries whose class holds < edges[0], edges[0]..edges[1]-1 and >= edges[1] images."""
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    size = counts[inverse]
    queries = np.flatnonzero(size > 1)
    _, rows = search(emb[queries], emb, 1, query_ids=queries)
    hit = labels[rows[:, 0]] == labels[queries]
    bins = np.digitize(size[queries], edges)
    names = [f"<{edges[0]}", *[f"{a}-{b - 1}" for a, b in zip(edges, edges[1:], strict=False)], f">={edges[-1]}"]
    return {
        name: {
            "queries": int((bins == b).sum()),
            "recall@1": float(hit[bins == b].mean()) if (bins == b).any() else None,
        }
        for b, name in enumerate(names)
    }


def analyse(record: dict, split: str = "val") -> dict:
    """One protocol record's diagnosis (its run folder and the eval folder of ``split``)."""
    run_dir = Path(record["run_dir"])
    loss = record["settings"]["loss"]
    alpha = loss.get("alpha") if loss["name"] == "pddm" else None
    beta = loss.get("beta") if loss["name"] == "pddm" else None
    out = {
        "method": record["method"],
        "config": record["config"],
        "seed": record["seed"],
        "recall@1": record["recall@1"],
        "map@r": record["map@r"],
        "rerank@8/recall@1": record.get("rerank@8/recall@1"),
        "training": training(read_records(run_dir / "metrics.jsonl"), alpha),
    }
    trained = run_dir / "eval-protocol-train" / "metrics.json"  # `distpddm eval RUN --shards <train split>`
    if trained.exists():
        figures = json.loads(trained.read_text())
        out["train_recall@1"], out["train_map@r"] = figures.get("recall@1"), figures.get("map@r")
    eval_dir = run_dir / f"eval-protocol-{split}"
    if (eval_dir / LABELS).exists():
        emb, labels, _ = load_embeddings(eval_dir)
        source = json.loads((eval_dir / SOURCE).read_text()) if (eval_dir / SOURCE).exists() else {}
        scorer = None
        if loss["name"] == "pddm" and source.get("model") and Path(source["model"]).is_file():
            scorer = load_exported_metric(source["model"])
            scorer = None if type(scorer).__name__ == "Euclidean" else scorer.eval()
        out["hardest_pairs"] = hardest_pairs(emb, labels, scorer, beta)
        out["by_class_size"] = recall_by_class_size(emb, labels)
    return out


def _fmt(v) -> str:
    return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def markdown(results: list[dict]) -> str:
    head = ["run", "steps", "loss", "spread", "mined", "active (E_e / pair)", "E_m active", "S+ / S-",
            "E_m / 2 alpha", "collapsed"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        name = f"{r['method']}:{r['config']} s{r['seed']}"
        for t in r["training"]:
            scores = f"{_fmt(t.get('pos_score'))} / {_fmt(t.get('neg_score'))}" if "pos_score" in t else "–"
            collapsed = f"{t['collapsed_steps']}/{t['logged_steps']}" if "collapsed_steps" in t else "–"
            lines.append(
                f"| {name} | {t['steps']} | {_fmt(t['loss'])} | {_fmt(t['spread'])} | {_fmt(t.get('mined'))} | "
                f"{_fmt(t['active'])} | "
                f"{_fmt(t.get('active_metric'))} | {scores} | {_fmt(t.get('metric_loss_over_2alpha'))} | {collapsed} |"
            )
    head = ["run", "R@1", "MAP@R", "train-class R@1 / MAP@R", "re-ranked R@1", "d(hardest +)", "d(nearest -)",
            "+ nearer", "gap > beta", "unit: S+ > S-", "R@1 by class size"]  # fmt: skip
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        h = r.get("hardest_pairs", {})
        sizes = ", ".join(f"{k}: {_fmt(v['recall@1'])} ({v['queries']})" for k, v in r.get("by_class_size", {}).items())
        lines.append(
            f"| {r['method']}:{r['config']} s{r['seed']} | {_fmt(r['recall@1'])} | {_fmt(r['map@r'])} | "
            f"{_fmt(r.get('train_recall@1'))} / {_fmt(r.get('train_map@r'))} | {_fmt(r['rerank@8/recall@1'])} | "
            f"{_fmt(h.get('hardest_positive_distance'))} | {_fmt(h.get('hardest_negative_distance'))} | "
            f"{_fmt(h.get('positive_nearer'))} | "
            f"{_fmt(h.get('gap_above_beta'))} | {_fmt(h.get('metric_positive_higher'))} | {sizes} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], runs: list[list[dict]], out: Path) -> None:
    """Spread, active hinges and (PDDM) the mined scores' gap against step, one line per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for r, rows in zip(results, runs, strict=True):
        steps = [x for x in rows if x.get("step", 0) > 0 and "loss" in x]
        if not steps:
            continue
        label = f"{r['method']}:{r['config']} (R@1 {r['recall@1']:.3f})"
        xs = [x["step"] for x in steps]
        line = axes[0].plot(xs, [x.get("spread", np.nan) for x in steps], label=label)[0]
        active = _active_key(steps[0])
        if active:
            axes[1].plot(xs, [x.get(active, np.nan) for x in steps], color=line.get_color())
        if "pos_score" in steps[0]:
            axes[2].plot(xs, [x["pos_score"] - x["neg_score"] for x in steps], color=line.get_color())
    axes[0].set(title="embedding spread (~0: collapsed)", xlabel="step")
    axes[1].set(title="share of active hinges (E_e / pair loss)", xlabel="step", ylim=(0, 1.02))
    axes[2].set(title="PDDM unit: S(mined +) - S(mined -)", xlabel="step")
    axes[2].axhline(0, color="grey", lw=0.8)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("table", "plot"):
        s = sub.add_parser(name)
        s.add_argument("results", type=Path, help="a protocol results jsonl (val records are read)")
        if name == "plot":
            s.add_argument("out", type=Path)
        else:
            s.add_argument("--json", type=Path, help="also write the diagnosis as JSON")
    args = p.parse_args(argv)
    records = [r for r in read_records(args.results) if r.get("split") == "val"]
    records = [r for r in records if Path(r["run_dir"]).is_dir()]
    if not records:
        print(f"{args.results}: no validation record whose run folder is here", file=sys.stderr)
        return 1
    results = [analyse(r) for r in records]
    if args.cmd == "plot":
        plot(results, [read_records(Path(r["run_dir"]) / "metrics.jsonl") for r in records], args.out)
        print(f"-> {args.out}")
        return 0
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
