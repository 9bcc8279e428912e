#!/usr/bin/env bash
# Collapse ablation through the real trainer (`distpddm train --local`, DeepSpeed ZeRO-1, glyph shards):
# 150 steps, SmallCNN from random init, 8 classes x 4 images, the fonts.yaml loss. Prints, per variant,
# held-out Recall@1 before/after and the embedding spread every 25 steps (about 0.15 = collapsed).
#   bash bench/collapse.sh            (needs shards/out/fonts: make shards-fonts)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=$(mktemp -d)
clip=$out/ds_clip1.json
$PY - "$clip" <<'PY'
import json, sys
d = json.load(open("configs/deepspeed/zero1_cpu.json"))
d["gradient_clipping"] = 1.0  # DeepSpeed's own default when the key is absent
json.dump(d, open(sys.argv[1], "w"))
PY
run() {
  local name=$1; shift
  RAY_USAGE_STATS_ENABLED=0 $PY -m distpddm.cli train --local configs/fonts.yaml name=$name ray.storage_path=$out \
    train.steps=150 train.log_every=25 train.checkpoint_every=150 train.progress=false optim.warmup_steps=5 \
    data.classes_per_batch=8 data.val_max_images=4000 "$@" > "$out/$name.log" 2>&1
  $PY - "$out/$name" "$name" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1] + "/metrics.jsonl")]
val = [r for r in rows if "val_recall@1" in r]
spread = [round(r["spread"], 2) for r in rows if "spread" in r]
print(f"{sys.argv[2]:>28}: R@1 {val[0]['val_recall@1']:.3f} -> {val[-1]['val_recall@1']:.3f}   spread {spread}")
PY
}
run "clip1.0-cosine" train.deepspeed=$clip &
run "noclip-cosine" &
wait
run "clip1.0-constant-lr" train.deepspeed=$clip optim.min_lr_ratio=1.0 &
run "noclip-constant-lr" optim.min_lr_ratio=1.0 &
wait
rm -rf "$out"
