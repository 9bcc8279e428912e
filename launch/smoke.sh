#!/usr/bin/env bash
# One device, configs/smoke.yaml, a few hundred steps (`distpddm smoke`, distpddm/smoke.py): prints images/s,
# checks that it learned (held-out Recall@1 on the shards' test split rose from step 0 by more than one standard
# error of that figure; without a test split,
# the loss fell, labelled as a fallback) and that the exported model loads; bf16 on a GPU, fp32 on a CPU.
#   launch/smoke.sh [--steps N] [--device auto|cpu|gpu] [--out DIR] [section.key=value ...]
# Builds the glyph shards it trains on (shards/out/fonts, as `make shards-fonts`) when they are missing.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PY:-}" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then PY=$repo/.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" RAY_USAGE_STATS_ENABLED=0
if [ ! -f "$repo/shards/out/fonts/train/index.json" ]; then
  "$PY" -m distpddm.cli shards build --source fonts "$repo/shards/out/fonts" --font-size 32 --shard-size 8M --quiet
fi
exec "$PY" -m distpddm.cli smoke "$@"
