"""The test-class table of one data set and regime, from the final command's records only, with issue 23's verdict.

    python experiments/protocol/report.py clipart scratch            # markdown table + verdict
    python experiments/protocol/report.py clipart scratch --json F   # also the figures as JSON

Only ``final`` records on ``split == "test"`` of the configurations ``chosen/<dataset>_<regime>.json`` names
count; they must all come from one clean commit (the table names it), one record per seed. Per method: mean
and sample standard deviation over the seeds of Recall@1 and MAP@R. The verdict, given only once every chosen
method has all its seeds, follows the issue's goal: PDDM's mean at or above the best baseline's on both
metrics, a lead claimed only where the gap exceeds both methods' seed standard deviations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402

METRICS = ("recall@1", "map@r")
SEEDS = (0, 1, 2)


def summarise(records: list[dict], chosen: dict[str, str], seeds=SEEDS) -> dict[str, dict]:
    """method -> {config, seeds, complete, commit, <metric>: {mean, sd, values}} over the final test records of
    the chosen configurations. A seed recorded twice is refused (no picking the better test run), as are
    records of more than one commit or of a dirty tree; a method short of ``seeds`` is marked incomplete."""
    found: dict[tuple[str, int], dict] = {}
    for r in records:
        if r.get("final") and r.get("split") == "test" and chosen.get(r["method"]) == r["config"]:
            if (r["method"], r["seed"]) in found:
                raise ValueError(f"{r['method']} seed {r['seed']} has more than one final record")
            found[(r["method"], r["seed"])] = r
    commits = {(r["commit"], bool(r["dirty"])) for r in found.values()}
    if len(commits) > 1:
        raise ValueError(f"final records from more than one commit or tree state: {sorted(commits)}")
    if any(dirty for _, dirty in commits):
        raise ValueError("final records from a dirty tree")
    out: dict[str, dict] = {}
    for method in chosen:
        rows = sorted((r for (m, _), r in found.items() if m == method), key=lambda r: r["seed"])
        if not rows:
            out[method] = {"config": chosen[method], "seeds": [], "complete": False}
            continue
        have = [r["seed"] for r in rows]
        entry = {"config": chosen[method], "seeds": have, "complete": sorted(have) == sorted(seeds)}
        entry["commit"] = rows[0]["commit"]
        for metric in METRICS:
            values = [float(r[metric]) for r in rows]
            sd = statistics.stdev(values) if len(values) > 1 else float("nan")
            entry[metric] = {"mean": statistics.fmean(values), "sd": sd, "values": values}
        out[method] = entry
    return out


def verdict(summary: dict[str, dict], ours: str = "pddm") -> list[str]:
    """One sentence per metric, PDDM against the best baseline by that metric's mean, then whether the goal
    holds (at or above on both); nothing while a chosen method is short of its seeds."""
    missing = [m for m, s in summary.items() if not s["complete"]]
    if missing or ours not in summary or len(summary) < 2:
        return [f"no verdict: seeds missing for {', '.join(missing) or 'PDDM or every baseline'}"]
    lines, at_or_above = [], True
    for metric in METRICS:
        baselines = {m: s for m, s in summary.items() if m != ours}
        best = max(baselines, key=lambda m: baselines[m][metric]["mean"])
        a, b = summary[ours][metric], baselines[best][metric]
        gap, noise = a["mean"] - b["mean"], max(a["sd"], b["sd"])
        at_or_above &= gap >= 0
        if gap > noise:
            word = f"leads by {gap:+.3f}, beyond both seed standard deviations (<= {noise:.3f})"
        elif gap >= 0:
            word = f"is level or ahead by {gap:+.3f}, within the seed standard deviation ({noise:.3f}): no lead"
        elif -gap > noise:
            word = f"trails by {gap:+.3f}, beyond both seed standard deviations (<= {noise:.3f})"
        else:
            word = f"trails by {gap:+.3f}, within the seed standard deviation ({noise:.3f})"
        lines.append(f"{metric}: PDDM {word} against {best} (the best baseline by mean).")
    lines.append(
        "goal: met (PDDM's mean at or above the best baseline's on both metrics)."
        if at_or_above
        else "goal: NOT met (PDDM's mean below the best baseline's on at least one metric)."
    )
    return lines


def markdown(summary: dict[str, dict]) -> str:
    n = max(len(s["seeds"]) for s in summary.values())  # the table needs one measured method (main checks)
    head = f"| method: configuration | test Recall@1 (mean ± sd, {n} seeds) | test MAP@R | per seed (R@1 / MAP@R) |"
    lines = [head, "|---|---|---|---|"]
    measured = {m: s for m, s in summary.items() if s["seeds"]}
    order = sorted(measured, key=lambda m: -measured[m]["recall@1"]["mean"])
    for m in order:
        s = measured[m]
        cells = [f"{s[k]['mean']:.3f} ± {s[k]['sd']:.3f}" for k in METRICS]
        seeds = ", ".join(
            f"s{seed}: {r:.3f} / {q:.3f}"
            for seed, r, q in zip(s["seeds"], s["recall@1"]["values"], s["map@r"]["values"], strict=True)
        )
        note = "" if s["complete"] else " (incomplete)"
        lines.append(f"| {m}: {s['config']}{note} | {cells[0]} | {cells[1]} | {seeds} |")
    lines += [f"| {m}: {s['config']} (not run yet) | – | – | – |" for m, s in summary.items() if not s["seeds"]]
    commit = measured[order[0]]["commit"]
    lines.append(f"\nAll at commit {commit[:7]} (clean tree).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset")
    p.add_argument("regime", choices=run.REGIMES)
    p.add_argument("--results", type=Path, help="default results/<dataset>_<regime>.jsonl")
    p.add_argument("--json", type=Path, help="also write the summary here")
    args = p.parse_args(argv)
    chosen_file = run.chosen_path(args.dataset, args.regime)
    if not chosen_file.exists():
        print(f"error: {chosen_file} is missing: choose on validation first (choose.py --write)", file=sys.stderr)
        return 1
    chosen = json.loads(chosen_file.read_text())["chosen"]
    source = args.results or run.results_path(args.dataset, args.regime)
    try:
        summary = summarise(run.read_records(source), chosen)
    except ValueError as e:
        print(f"error: {source}: {e}", file=sys.stderr)
        return 1
    if not any(s["seeds"] for s in summary.values()):
        print(f"error: {source} holds no final test record of the chosen configurations", file=sys.stderr)
        return 1
    said = verdict(summary)
    print(markdown(summary))
    print()
    print("\n".join(said))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "verdict": said}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
