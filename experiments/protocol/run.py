"""One protocol run through the product: ``distpddm train --local`` then ``distpddm eval``, one JSON record.

    python experiments/protocol/run.py --dataset fonts --regime scratch --method multi_similarity \\
        --config default --seed 0 --split val                    # a tuning run, on the validation classes
    python experiments/protocol/run.py --dataset fonts --regime scratch --chosen --seeds 0 1 2 \\
        --split test --final                                     # THE final command (clean, committed tree)
    python experiments/protocol/run.py ... --dry-run             # print the commands, run nothing
    python experiments/protocol/run.py --dataset fonts --regime scratch --config all --split val \\
        --resume                                                 # the grid, skipping the runs already recorded

Training always validates on the ``val`` classes (its own Recall@K curve); ``--split`` names the classes the
record's figures come from: ``val`` for every choice, ``test`` only with ``--final`` on a clean tree (every
choice committed: the grid in grid.py, the chosen configurations in chosen/<dataset>_<regime>.json).
Each record (appended to results/<dataset>_<regime>.jsonl) holds every setting, the product's commands,
Recall@1 and MAP@R (Euclidean; the PDDM re-ranked figures beside them), the commit it ran at and whether the tree
was dirty, and the wall times.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))

import build  # noqa: E402
import grid  # noqa: E402
import splits  # noqa: E402

REGIMES = ("scratch", "lite0")
CONFIGS = HERE / "configs"
RESULTS = HERE / "results"
CHOSEN = HERE / "chosen"
DEFAULT_RUNS = REPO / "runs" / "protocol"


class Refused(RuntimeError):
    """The protocol forbids this run (the message says why)."""


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout


def tree_state() -> tuple[str, bool, list[str]]:
    """(HEAD commit, dirty?, the changed paths) of the checkout; untracked files count (ignored ones do not)."""
    changed = [line[3:] for line in git("status", "--porcelain").splitlines() if line.strip()]
    return git("rev-parse", "HEAD").strip(), bool(changed), changed


def base_config(dataset: str, regime: str) -> Path:
    return CONFIGS / f"{dataset}_{regime}.yaml"


def results_path(dataset: str, regime: str) -> Path:
    return RESULTS / f"{dataset}_{regime}.jsonl"


def read_records(path: Path) -> list[dict]:
    """A jsonl file's records (a results file, a run's metrics.jsonl); a missing file holds none."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def chosen_path(dataset: str, regime: str) -> Path:
    return CHOSEN / f"{dataset}_{regime}.json"


def run_name(dataset: str, regime: str, method: str, config_id: str, seed: int, split: str, stamp: str) -> str:
    return f"{dataset}-{regime}-{method}-{config_id}-s{seed}-{split}-{stamp}"


def commands(
    dataset: str,
    regime: str,
    method: str,
    config_id: str,
    seed: int,
    split: str,
    *,
    name: str,
    runs: Path = DEFAULT_RUNS,
    shards_root: Path | None = None,
    extra: list[str] | None = None,
) -> tuple[list[str], list[str], Path, Path]:
    """(train command, eval command, run folder, eval folder) of one run."""
    cli = build.product_cli()
    overrides = [*grid.overrides(method, config_id), f"train.seed={seed}", f"ray.storage_path={runs}", f"name={name}"]
    if shards_root is not None:  # elsewhere than the config's shards/out/protocol (tests)
        overrides += [
            f"data.train_shards={build.shards_dir(dataset, shards_root) / 'train'}",
            f"data.val_shards={build.shards_dir(dataset, shards_root) / 'val'}",
        ]
    overrides += list(extra or [])
    run_dir = Path(runs) / name
    eval_dir = run_dir / f"eval-protocol-{split}"
    split_shards = build.shards_dir(dataset, shards_root or build.DEFAULT_ROOT) / split
    train = [*cli, "train", str(base_config(dataset, regime)), *overrides, "--local"]
    evaluate = [
        *cli,
        "eval",
        str(run_dir),
        "--shards",
        str(split_shards),
        "--out",
        str(eval_dir),
        "--local",
        "--no-report",
        "--no-nmi",
        "--quiet",
    ]
    return train, evaluate, run_dir, eval_dir


def recorded(records: list[dict], method: str, config_id: str, seed: int, split: str, final: bool, commit: str) -> bool:
    """Whether ``records`` hold this run already (``--resume``): the same method, configuration, seed and
    classes, no extra overrides; for the final command, also at this commit (a final's seeds are one commit's)."""
    return any(
        r.get("method") == method
        and r.get("config") == config_id
        and r.get("seed") == seed
        and r.get("split") == split
        and not r.get("extra_overrides")
        and bool(r.get("final")) == final
        and (not final or r.get("commit") == commit)
        for r in records
    )


def show(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def check_allowed(split: str, final: bool, dirty: bool, changed: list[str]) -> None:
    if split == "test" and not final:
        raise Refused("the test classes are for the final command only: add --final (after committing every choice)")
    if split == "test" and dirty:
        raise Refused(
            "--final needs a clean tree (every choice committed, so the record's commit is what ran); changed: "
            + ", ".join(changed[:10])
        )
    if final and split != "test":
        raise Refused("--final is the test-split command; tuning runs use --split val without it")


def _training_summary(run_dir: Path) -> dict:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out: dict = {"collapsed_steps": sum(bool(r.get("metric_collapsed")) for r in rows)}
    for r in rows:
        if r.get("step") == 0 and "val_recall@1" in r:  # the untrained (or ImageNet) network's
            out["val0_recall@1"], out["val0_map@r"] = r["val_recall@1"], r.get("val_map@r")
            continue
        for key in ("val_recall@1", "val_map@r", "loss", "spread", "step"):
            if key in r:
                out[key] = r[key]
    steps = sorted(r["time_step"] for r in rows if "time_step" in r)
    if steps:
        out["median_step_s"] = steps[len(steps) // 2]
    return out


def run_one(
    dataset: str,
    regime: str,
    method: str,
    config_id: str,
    seed: int,
    split: str,
    *,
    final: bool = False,
    dry_run: bool = False,
    runs: Path = DEFAULT_RUNS,
    shards_root: Path | None = None,
    results: Path | None = None,
    extra: list[str] | None = None,
    state: tuple[str, bool, list[str]] | None = None,
) -> dict | None:
    """Train, evaluate, append the record (returned); ``dry_run``: print the commands only. ``state``: the tree's
    (commit, dirty, changed) when the command started (a series of runs is judged, and recorded, by its start:
    its own records make the tree dirty)."""
    commit, dirty, changed = state or tree_state()
    check_allowed(split, final, dirty and not dry_run, changed)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    name = run_name(dataset, regime, method, config_id, seed, split, stamp)
    train, evaluate, run_dir, eval_dir = commands(
        dataset, regime, method, config_id, seed, split, name=name, runs=runs, shards_root=shards_root, extra=extra
    )
    if dry_run:
        print(show(train))
        print(show(evaluate))
        return None
    Path(runs).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    print("$ " + show(train), flush=True)
    subprocess.run(train, cwd=REPO, check=True)
    t1 = time.time()
    print("$ " + show(evaluate), flush=True)
    subprocess.run(evaluate, cwd=REPO, check=True)
    t2 = time.time()
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    record = {
        "dataset": dataset,
        "regime": regime,
        "method": method,
        "config": config_id,
        "settings": grid.config(method, config_id),
        "extra_overrides": list(extra or []),
        "seed": seed,
        "split": split,
        "final": final,
        "recall@1": metrics.get("recall@1"),
        "map@r": metrics.get("map@r"),
        "rerank@8/recall@1": metrics.get("rerank@8/recall@1"),
        "metrics": metrics,
        "training": _training_summary(run_dir),
        "commit": commit,
        "dirty": dirty,
        "changed": changed[:50],
        "split_file_sha256": hashlib.sha256(splits.path(dataset).read_bytes()).hexdigest(),
        "base_config": str(base_config(dataset, regime).relative_to(REPO)),
        "train_command": show(train),
        "eval_command": show(evaluate),
        "run_dir": str(run_dir),
        "train_s": round(t1 - t0, 1),
        "eval_s": round(t2 - t1, 1),
        "wall_s": round(t2 - t0, 1),
        "host": socket.gethostname(),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    out = Path(results) if results else results_path(dataset, regime)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    print(
        f"{dataset}/{regime} {method}:{config_id} seed {seed} on {split}: "
        f"Recall@1 {record['recall@1']:.4f}  MAP@R {record['map@r']:.4f}  ({record['wall_s']:.0f} s) -> {out}"
    )
    return record


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dataset", choices=splits.DATASETS, required=True)
    p.add_argument("--regime", choices=REGIMES, required=True)
    p.add_argument("--method", choices=grid.METHODS, help="one method (default with --config all: every method)")
    p.add_argument("--config", default="default", help="a config id of grid.py, or 'all' (the method's whole row)")
    p.add_argument("--chosen", action="store_true", help="every method's configuration in chosen/<ds>_<regime>.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", help="several seeds (overrides --seed)")
    p.add_argument("--split", choices=("val", "test"), default="val", help="the classes the figures come from")
    p.add_argument("--final", action="store_true", help="the one final command: the test split, a clean tree")
    p.add_argument("--dry-run", action="store_true", help="print the product commands; run nothing")
    p.add_argument("--resume", action="store_true", help="skip the runs the results file already records")
    p.add_argument("--runs", type=Path, default=DEFAULT_RUNS, help=f"run folders (default {DEFAULT_RUNS})")
    p.add_argument(
        "--shards-root", type=Path, help=f"shards built by build.py elsewhere (default {build.DEFAULT_ROOT})"
    )
    p.add_argument("--results", type=Path, help="the jsonl to append to (default results/<dataset>_<regime>.jsonl)")
    p.add_argument("--set", dest="extra", action="append", default=[], help="one more train override (smoke tests)")
    args = p.parse_args(argv)

    if args.chosen:
        chosen = json.loads(chosen_path(args.dataset, args.regime).read_text())["chosen"]
        plan = [(m, chosen[m]) for m in grid.METHODS if m in chosen]
    else:
        methods = [args.method] if args.method else (list(grid.METHODS) if args.config == "all" else [])
        if not methods:
            p.error("--method is needed (or --config all for every method, or --chosen)")
        plan = [(m, c) for m in methods for c in (grid.GRID[m] if args.config == "all" else [args.config])]
    if args.extra and args.split == "test":
        p.error("--set changes the protocol: not with the test split")
    try:
        state = tree_state()
        check_allowed(args.split, args.final, state[1] and not args.dry_run, state[2])  # a dry run may preview it
        results = args.results or results_path(args.dataset, args.regime)
        done = read_records(results) if args.resume else []
        for method, config_id in plan:
            for seed in args.seeds or [args.seed]:
                if recorded(done, method, config_id, seed, args.split, args.final, state[0]):
                    print(f"recorded already: {method}:{config_id} seed {seed} on {args.split}", flush=True)
                    continue
                run_one(
                    args.dataset,
                    args.regime,
                    method,
                    config_id,
                    seed,
                    args.split,
                    final=args.final,
                    dry_run=args.dry_run,
                    runs=args.runs,
                    shards_root=args.shards_root,
                    results=args.results,
                    extra=args.extra,
                    state=state,
                )
    except Refused as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"error: the product's command failed (exit {e.returncode}): {show(e.cmd)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
