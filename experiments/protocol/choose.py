"""The choice, from validation records only: per method the configuration with the best Recall@1 (ties: MAP@R).

    python experiments/protocol/choose.py fonts scratch            # print the choice
    python experiments/protocol/choose.py fonts scratch --write    # -> chosen/fonts_scratch.json (commit it)
    python experiments/protocol/choose.py --defaults scratch       # PDDM's defaults for a regime: best mean
                                                                   # val Recall@1 over its data sets

Only ``split == "val"`` records of the tuning seed (0) count, and only those of the configurations grid.py still
lists; a method whose row is not complete is reported as such (its choice is still the best so far). The final
command (``run.py --chosen --split test --final``) reads the written file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import grid  # noqa: E402
import run  # noqa: E402

TUNING_SEED = 0


def tuning(records: list[dict], seed: int = TUNING_SEED) -> dict[tuple[str, str], dict]:
    """(method, config) -> its tuning record: validation, the tuning seed, no extra overrides, a configuration
    grid.py still lists; one run more than once counts by its latest record."""
    latest: dict[tuple[str, str], dict] = {}
    for r in records:
        if r.get("split") != "val" or r.get("seed") != seed or r.get("extra_overrides"):
            continue
        if r["method"] in grid.GRID and r["config"] in grid.GRID[r["method"]]:
            latest[(r["method"], r["config"])] = r
    return latest


def choose(records: list[dict], seed: int = TUNING_SEED) -> dict[str, dict]:
    """method -> {config, recall@1, map@r, commit, tried, complete}: the best validation configuration."""
    latest = tuning(records, seed)
    out = {}
    for method in grid.METHODS:
        rows = [r for (m, _), r in latest.items() if m == method]
        if not rows:
            continue
        best = max(rows, key=lambda r: (r["recall@1"], r["map@r"]))
        out[method] = {
            "config": best["config"],
            "recall@1": best["recall@1"],
            "map@r": best["map@r"],
            "commit": best["commit"],
            "tried": sorted(r["config"] for r in rows),
            "complete": len(rows) == len(grid.GRID[method]),
        }
    return out


def across(per_dataset: dict[str, list[dict]], method: str = "pddm", seed: int = TUNING_SEED) -> list[dict]:
    """The rule for a regime's defaults (README, "how a regime's defaults follow two data sets"): ``method``'s
    configurations ranked by validation Recall@1 averaged over the data sets (ties: mean MAP@R), only those
    run on every one of them. Each row: {config, recall@1, map@r, per_dataset: {name: (recall@1, map@r)}}."""
    found: dict[str, dict[str, tuple[float, float]]] = {}
    for name, records in per_dataset.items():
        for (m, config), r in tuning(records, seed).items():
            if m == method:
                found.setdefault(config, {})[name] = (r["recall@1"], r["map@r"])
    rows = []
    for config, figures in found.items():
        if len(figures) == len(per_dataset):
            r1 = sum(f[0] for f in figures.values()) / len(figures)
            mapr = sum(f[1] for f in figures.values()) / len(figures)
            rows.append({"config": config, "recall@1": r1, "map@r": mapr, "per_dataset": figures})
    return sorted(rows, key=lambda row: (-row["recall@1"], -row["map@r"]))


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--defaults"]:
        return defaults_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset")
    p.add_argument("regime", choices=run.REGIMES)
    p.add_argument("--results", type=Path, help="default results/<dataset>_<regime>.jsonl")
    p.add_argument("--write", action="store_true", help="write chosen/<dataset>_<regime>.json")
    args = p.parse_args(argv)
    source = args.results or run.results_path(args.dataset, args.regime)
    picked = choose(run.read_records(source))
    if not picked:
        print(f"no tuning records in {source} (split val, seed 0, no --set overrides)", file=sys.stderr)
        return 1
    for method, c in picked.items():
        note = "" if c["complete"] else f"  (row incomplete: {len(c['tried'])} of {len(grid.GRID[method])} run)"
        print(f"{method:<17} {c['config']:<24} Recall@1 {c['recall@1']:.4f}  MAP@R {c['map@r']:.4f}{note}")
    if args.write:
        out = run.chosen_path(args.dataset, args.regime)
        out.parent.mkdir(parents=True, exist_ok=True)
        body = {"dataset": args.dataset, "regime": args.regime, "rule": "best val Recall@1, ties by MAP@R, seed 0"}
        body["chosen"] = {m: c["config"] for m, c in picked.items()}
        body["evidence"] = picked
        out.write_text(json.dumps(body, indent=1) + "\n")
        print(f"-> {out}")
    return 0


def defaults_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="choose.py --defaults", description=across.__doc__.split(".")[0])
    p.add_argument("regime", choices=run.REGIMES)
    p.add_argument("--datasets", nargs="+", default=["clipart", "fonts"])
    args = p.parse_args(argv)
    per = {d: run.read_records(run.results_path(d, args.regime)) for d in args.datasets}
    rows = across(per)
    if not rows:
        print(f"no PDDM configuration has validation records on all of {', '.join(args.datasets)}", file=sys.stderr)
        return 1
    for row in rows:
        each = ", ".join(f"{d} {r1:.4f} / {m:.4f}" for d, (r1, m) in row["per_dataset"].items())
        print(f"{row['config']:<24} mean Recall@1 {row['recall@1']:.4f}  MAP@R {row['map@r']:.4f}  ({each})")
    missing = [c for c in grid.GRID["pddm"] if c not in {row["config"] for row in rows}]
    if missing:
        print(f"not yet on every data set: {', '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
