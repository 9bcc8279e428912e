"""Why one criterion beats another on the held-out fonts: diagnostics from the embeddings that
``experiments/quality.py run --save-embeddings DIR`` writes (final model, no augmentation).

Each seed of row A is paired with the same seed of row B (same initialisation and batches), and three
questions are answered per seed, then summarised over seeds:

- **transfer**: does B fit the *training* fonts as well as A (Recall@1 / MAP@R among the training images it
  trained on) and lose only on the held-out fonts, or is it behind on both?
- **where**: which held-out fonts carry the gap? Fonts are put in equal-count bins by how hard raw pixels find
  them (each font's raw-pixel Recall@1 at the protocol's size), and the per-font gap is averaged per bin.
- **overlap**: of the held-out queries, how many both rows get right at rank 1, only A, only B, neither.

    python experiments/diagnose.py compare DIR --protocol scratch --rows pml_ms pddm_allpos_b01 --seeds 0 1 2 --json F
    python experiments/diagnose.py plot experiments/results/why.png F [G ...]   # the per-bin gap, one line per file
    python experiments/diagnose.py table F [G ...] --csv experiments/results/diagnose.csv   # the summaries, as CSV

An experiment, not part of the product: it imports the installed ``distpddm`` as any user would.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from distpddm.retrieval import retrieval_metrics, search


def top1_hits(emb: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Whether each image's nearest other image shares its class (exact search, the image itself left out)."""
    labels = np.asarray(labels)
    _, rows = search(emb, emb, 1, query_ids=np.arange(len(emb)))
    return labels[rows[:, 0]] == labels


def per_class(values: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Mean of ``values`` over each class's images, in the order of ``classes``."""
    return np.array([values[labels == c].mean() for c in classes])


def per_class_map(emb: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Each class's MAP@R (its images the queries, every image the gallery)."""
    return np.array([retrieval_metrics(emb, labels, (1,), queries=labels == c)["map@r"] for c in classes])


def difficulty_bins(raw_r1: np.ndarray, bins: int) -> np.ndarray:
    """Bin number (0 = hardest) of each class: equal-count bins of the classes ordered by raw-pixel Recall@1
    (ties kept in class order, so the bins are equal in size whatever the ties)."""
    order = np.argsort(raw_r1, kind="stable")
    out = np.empty(len(raw_r1), dtype=np.int64)
    for b, idx in enumerate(np.array_split(order, bins)):
        out[idx] = b
    return out


def overlap(hits_a: np.ndarray, hits_b: np.ndarray) -> dict[str, int]:
    return {
        "both": int((hits_a & hits_b).sum()),
        "only A": int((hits_a & ~hits_b).sum()),
        "only B": int((~hits_a & hits_b).sum()),
        "neither": int((~hits_a & ~hits_b).sum()),
    }


def compare_seed(a: dict, b: dict, raw_bins: np.ndarray, classes: np.ndarray) -> dict:
    """The three diagnostics for one seed; ``a`` and ``b`` hold test / train embeddings and labels."""
    if not np.array_equal(a["test_labels"], b["test_labels"]) or not np.array_equal(
        a["train_labels"], b["train_labels"]
    ):
        raise ValueError("the two runs embedded different images: not a paired comparison")
    y = a["test_labels"]
    out = {}
    for part in ("train", "test"):
        for tag, run in (("A", a), ("B", b)):
            m = retrieval_metrics(run[part], run[f"{part}_labels"], (1,))
            out[f"{part} {tag}"] = {"recall@1": m["recall@1"], "map@r": m["map@r"]}
    hits = {tag: top1_hits(run["test"], y) for tag, run in (("A", a), ("B", b))}
    out["overlap"] = overlap(hits["A"], hits["B"])
    r1 = {tag: per_class(h.astype(float), y, classes) for tag, h in hits.items()}
    ap = {tag: per_class_map(run["test"], y, classes) for tag, run in (("A", a), ("B", b))}
    out["bins"] = [
        {
            "fonts": int((raw_bins == k).sum()),
            "recall@1 A": float(r1["A"][raw_bins == k].mean()),
            "recall@1 B": float(r1["B"][raw_bins == k].mean()),
            "map@r A": float(ap["A"][raw_bins == k].mean()),
            "map@r B": float(ap["B"][raw_bins == k].mean()),
        }
        for k in range(int(raw_bins.max()) + 1)
    ]
    return out


def raw_difficulty(images: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Each class's raw-pixel Recall@1 (flattened pixels, Euclidean)."""
    flat = np.asarray(images, dtype=np.float32).reshape(len(images), -1)
    return per_class(top1_hits(flat, labels).astype(float), labels, classes)


def load_run(folder: Path, protocol: str, name: str, seed: int, steps: int) -> dict:
    from quality import embeddings_name

    path = folder / embeddings_name(protocol, name, seed, steps)
    if not path.exists():
        raise SystemExit(f"{path}: no embeddings (run experiments/quality.py run ... --save-embeddings {folder})")
    with np.load(path) as f:
        return {k: f[k] for k in ("test", "test_labels", "train", "train_labels")}


def summarise(per_seed: list[dict]) -> dict:
    """Means over seeds and the paired B - A differences (mean, s.d. over seeds)."""

    def stat(values) -> dict:
        v = np.asarray(values, dtype=float)
        return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0}

    out = {}
    for part in ("train", "test"):
        for k in ("recall@1", "map@r"):
            a = [s[f"{part} A"][k] for s in per_seed]
            b = [s[f"{part} B"][k] for s in per_seed]
            out[f"{part} {k}"] = {"A": stat(a), "B": stat(b), "B - A": stat(np.subtract(b, a))}
    out["overlap"] = {k: stat([s["overlap"][k] for s in per_seed]) for k in per_seed[0]["overlap"]}
    out["bins"] = []
    for i, first in enumerate(per_seed[0]["bins"]):
        row = {"fonts": first["fonts"]}
        for k in ("recall@1", "map@r"):
            a = [s["bins"][i][f"{k} A"] for s in per_seed]
            b = [s["bins"][i][f"{k} B"] for s in per_seed]
            row[k] = {"A": stat(a), "B": stat(b), "B - A": stat(np.subtract(b, a))}
        out["bins"].append(row)
    return out


def report(summary: dict, a: str, b: str, raw_edges: list[tuple[float, float]], seeds: int) -> str:
    """Markdown: the transfer table, the per-difficulty table, the overlap line."""

    def ms(s):
        return f"{s['mean']:.3f} ± {s['sd']:.3f}"

    def d(s):
        return f"{s['mean']:+.3f} ± {s['sd']:.3f}"

    lines = [f"A = {a}, B = {b}; {seeds} seed(s), paired; ± = s.d. over seeds", ""]
    lines += ["| fonts | metric | A | B | B - A |", "|---|---|---|---|---|"]
    for part, label in (("train", "training (seen)"), ("test", "held-out")):
        for k in ("recall@1", "map@r"):
            s = summary[f"{part} {k}"]
            lines.append(f"| {label} | {k} | {ms(s['A'])} | {ms(s['B'])} | {d(s['B - A'])} |")
    lines += ["", "| held-out fonts by raw-pixel Recall@1 | fonts | R@1 A | R@1 B | R@1 B - A | MAP@R B - A |"]
    lines.append("|---|---|---|---|---|---|")
    for (lo, hi), row in zip(raw_edges, summary["bins"], strict=True):
        r, m = row["recall@1"], row["map@r"]
        lines.append(
            f"| {lo:.2f}-{hi:.2f} | {row['fonts']} | {ms(r['A'])} | {ms(r['B'])} | {d(r['B - A'])} | {d(m['B - A'])} |"
        )
    o = summary["overlap"]
    lines += ["", "held-out queries at rank 1: " + ", ".join(f"{k} {v['mean']:.0f}" for k, v in o.items())]
    return "\n".join(lines)


def gap_figure(results: list[dict]):
    """Per-font gap B - A by raw-pixel difficulty bin, one line per comparison (protocol), Recall@1 and MAP@R
    side by side, error bars one seed s.d."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.4), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    for i, res in enumerate(results):
        bins = res["summary"]["bins"]
        x = np.arange(1, len(bins) + 1) + 0.06 * (i - (len(results) - 1) / 2)  # error bars side by side
        seeds = len(res["seeds"])
        for ax, key in zip(axes, ("recall@1", "map@r"), strict=True):
            mean = [b[key]["B - A"]["mean"] for b in bins]
            sd = [b[key]["B - A"]["sd"] for b in bins]
            label = f"{res['protocol']} ({seeds} seed{'s' * (seeds > 1)})" if key == "recall@1" else None
            ax.errorbar(x, mean, yerr=sd, marker="o", capsize=3, label=label)
    a, b = results[0]["rows"]
    for ax, key in zip(axes, ("Recall@1", "MAP@R"), strict=True):
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(np.arange(1, len(results[0]["summary"]["bins"]) + 1))
        ax.set_xlabel("held-out fonts in equal bins by raw-pixel Recall@1 (1 = hardest)")
        ax.set_title(f"per-font {key}: {b} minus {a}")
        ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncols=len(results), fontsize=8)
    return fig


def cmd_compare(args) -> None:
    import quality

    if args.bins < 1:
        raise SystemExit("--bins must be at least 1")
    a_name, b_name = args.rows
    runs = [
        (
            load_run(args.dir, args.protocol, a_name, s, args.steps),
            load_run(args.dir, args.protocol, b_name, s, args.steps),
        )
        for s in args.seeds
    ]
    _, test = quality.fonts(args.protocol, args.glyphs)
    if not np.array_equal(test.labels, runs[0][0]["test_labels"]):
        raise SystemExit("the saved held-out labels are not this protocol's test split (other glyphs?)")
    classes = np.unique(test.labels)
    if args.bins > len(classes):
        raise SystemExit(f"--bins {args.bins} is more than the {len(classes)} held-out fonts")
    raw = raw_difficulty(test.images, test.labels, classes)
    raw_bins = difficulty_bins(raw, args.bins)
    edges = [(float(raw[raw_bins == k].min()), float(raw[raw_bins == k].max())) for k in range(args.bins)]
    per_seed = [compare_seed(a, b, raw_bins, classes) for a, b in runs]
    summary = summarise(per_seed)
    print(f"{args.protocol}, {args.steps} steps")
    print(report(summary, a_name, b_name, edges, len(args.seeds)))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "protocol": args.protocol,
                    "steps": args.steps,
                    "rows": args.rows,
                    "seeds": args.seeds,
                    "raw_bins": edges,
                    "per_seed": per_seed,
                    "summary": summary,
                },
                indent=1,
            )  # fmt: skip
        )


def cmd_plot(args) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    results = [json.loads(Path(f).read_text()) for f in args.json]
    if len({tuple(r["rows"]) for r in results}) > 1:
        raise SystemExit(f"the files compare different rows: {sorted({tuple(r['rows']) for r in results})}")
    if len({len(r["summary"]["bins"]) for r in results}) > 1:
        raise SystemExit("the files use different numbers of --bins")
    fig = gap_figure(results)
    args.png.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(args.png))
    print(f"wrote {args.png}")


def csv_row(name: str, result: dict) -> dict:
    """One ``compare --json`` file as one line: rows, seeds, the held-out and training-font means (A, B) and the
    paired B - A (mean, s.d. over seeds), then B - A per raw-pixel difficulty bin (1 = hardest), 3 decimals."""
    s = result["summary"]
    out = {"file": name, "protocol": result["protocol"], "steps": result["steps"], "A": result["rows"][0],
           "B": result["rows"][1], "seeds": " ".join(str(x) for x in result["seeds"])}  # fmt: skip
    for part, label in (("test", "heldout"), ("train", "training")):
        for k in ("recall@1", "map@r"):
            st = s[f"{part} {k}"]
            out[f"{label}_{k}_A"] = f"{st['A']['mean']:.3f}"
            out[f"{label}_{k}_B"] = f"{st['B']['mean']:.3f}"
            out[f"{label}_{k}_B-A"] = f"{st['B - A']['mean']:.3f}"
            out[f"{label}_{k}_B-A_sd"] = f"{st['B - A']['sd']:.3f}"
    for k in ("recall@1", "map@r"):
        for i, b in enumerate(s["bins"], 1):
            out[f"{k}_B-A_bin{i}"] = f"{b[k]['B - A']['mean']:.3f}"
            out[f"{k}_B-A_bin{i}_sd"] = f"{b[k]['B - A']['sd']:.3f}"
    return out


def cmd_table(args) -> None:
    rows = [csv_row(Path(f).stem, json.loads(Path(f).read_text())) for f in args.json]
    columns = list(dict.fromkeys(k for r in rows for k in r))  # every file's columns, first seen first
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with args.csv.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.csv}: {len(rows)} comparisons")


def main() -> None:
    import quality

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="the three diagnostics for rows A and B, markdown (and --json)")
    c.add_argument("dir", type=Path, help="where experiments/quality.py run --save-embeddings wrote")
    c.add_argument("--protocol", choices=sorted(quality.PROTOCOLS), default="scratch")
    c.add_argument("--rows", nargs=2, metavar=("A", "B"), default=["pml_ms", "pddm_allpos_b01"])
    c.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    c.add_argument("--steps", type=int, default=1000)
    c.add_argument("--bins", type=int, default=4)
    c.add_argument("--glyphs", help="an .npz of the glyphs ({size} filled in), as experiments/quality.py --glyphs")
    c.add_argument("--json", type=Path, help="also write the per-seed figures and the summary here")
    pl = sub.add_parser("plot", help="the per-bin gap of one or more `compare --json` files, as a PNG")
    pl.add_argument("png", type=Path)
    pl.add_argument("json", nargs="+", type=Path)
    tb = sub.add_parser("table", help="the summaries of one or more `compare --json` files, one CSV line each")
    tb.add_argument("json", nargs="+", type=Path)
    tb.add_argument("--csv", type=Path, required=True, metavar="FILE")
    args = p.parse_args()
    {"compare": cmd_compare, "plot": cmd_plot, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
