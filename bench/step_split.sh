#!/usr/bin/env bash
# Step-time split of the real trainer (Ray Train + DeepSpeed ZeRO-1, configs/fonts.yaml, SmallCNN, 16 x 4
# images per worker) with 1 and 2 CPU workers: mean seconds per step over the logged steps after warm-up.
#   bash bench/step_split.sh          (needs shards/out/fonts: make shards-fonts)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=$(mktemp -d)
for workers in 1 2; do
  RAY_USAGE_STATS_ENABLED=0 $PY -m distpddm.cli train configs/fonts.yaml name=split$workers ray.storage_path=$out \
    ray.num_workers=$workers train.steps=80 train.log_every=5 train.checkpoint_every=80 train.progress=false \
    data.val_shards=null > "$out/split$workers.log" 2>&1
done
$PY - "$out" <<'PY'
import json, sys
parts = ["time_data", "time_forward", "time_comm", "time_mining_loss", "time_backward_step"]
print("| workers | step ms | data | forward | communication (gather) | mining + loss | backward + step (incl. all-reduce) | images/s |")
print("|---|---|---|---|---|---|---|---|")
for w in (1, 2):
    rows = [json.loads(l) for l in open(f"{sys.argv[1]}/split{w}/metrics.jsonl")]
    rows = [r for r in rows if "time_step" in r and r["step"] > 20]
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in parts + ["time_step", "images_per_s"]}
    share = " | ".join(f"{1e3 * mean[k]:.1f} ms ({100 * mean[k] / mean['time_step']:.0f}%)" for k in parts)
    print(f"| {w} | {1e3 * mean['time_step']:.1f} | {share} | {mean['images_per_s']:.0f} |")
PY
rm -rf "$out"
