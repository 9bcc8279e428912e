#!/usr/bin/env bash
# The project's GPU checks in one run, under 8 minutes on one GPU (an H200); figures to a JSON file and stdout.
#
#   bash bench/gpu_check.sh [OUT_JSON]      (default: a new temp folder's gpu_check.json; the path is printed)
#
# 1. parity: bench/gpu_parity.py: PDDMLoss's loss, gradients and mined quadruplets on the GPU equal the
#    CPU's (fp32, TF32 off; rtol 1e-4, atol 1e-5).
# 2. smoke: configs/smoke.yaml through `distpddm train --local` (bf16, DeepSpeed ZeRO-1 on the GPU,
#    300 steps), judged as `distpddm smoke` judges: it learned, i.e. held-out Recall@1 (the trainer's
#    validation on the first 512 images of SHARDS/test, classes it never trains on) rose from step 0 (the
#    untrained network) to the last step; and the exported model.pt loads with distpddm.model.load_exported,
#    has fp32 weights, and embeds a batch on the GPU into unit vectors. The loss is reported, not judged:
#    with hard mining it need not fall while the embedding improves (0.260 -> 0.290 in one such run).
# 3. throughput: ResNet-50 at 224 px, 32 classes x 4 images, bf16, 8 loader workers, 100 steps: images/s
#    and the step-time split (data, forward, gather, mining + loss, backward + step) after 30 warm-up steps.
# 4. mining: bench/mining.py --device cuda at a pool of 8,192 (dim 128).
# Without a GPU (torch.cuda.is_available() is False) the same four run small, end to end ("mode":
# "cpu-reduced"): parity CPU against CPU (trivially equal, the same code path); smoke in fp32 on the CPU
# for 30 steps, judged the same way; SmallCNN at 32 px, 8 x 4, 20 steps instead of ResNet-50; mining at a
# pool of 256.
# Each step has a time limit, cut to what is left of GPU_CHECK_BUDGET (450 s) for the whole run: about
# 4 minutes are expected on an H200. The runs are deleted at the end (GPU_CHECK_KEEP=1 keeps them, in a
# temp folder named on stderr). Exits 1 if any check fails. GPU_CHECK_MODE=gpu|cpu-reduced forces a
# mode; PY names the interpreter (default .venv/bin/python where it exists, else python3).
#
# Shards: SHARDS (a build folder holding train/ and test/) needs 32 classes of >= 4 images in train (8 for
# cpu-reduced), and test/ (held-out classes) for the smoke, which is skipped and fails without it.
# Unset: .gpu/shards where it exists (make gpu-pack), else shards/out/fonts (make shards-fonts, 89 MB).
#
# On the GPU machine lent through the device tool (Python 3.12 with torch 2.11, but no DeepSpeed,
# pydantic, hjson, WebDataset, TorchCodec, pytorch-metric-learning, nor this package):
#   1. here: `make gpu-pack` (.gpu/: a 60-class glyph shard split and the missing wheels, 26 MB)
#   2. the device tool's run with carry [".gpu"] and command `bash bench/gpu_check.sh $OUT/gpu_check.json`
#      (timeout_s 600); gpu_check.json and gpu_check.log (every step's output) come back.
# When `import deepspeed` fails and .gpu/whl exists, the wheels are installed into /tmp/site (pip
# --target, no index) and PYTHONPATH=/tmp/site:$PWD. If TorchCodec then cannot decode a PNG there, a
# stand-in package makes the stream decode with PIL (its own fallback) and the JSON's image_decoder says so;
# likewise, where faiss is missing (gpu-pack carries no faiss-cpu), a numpy stand-in does validation's exact
# nearest-neighbour search and the JSON's nearest_neighbours says so.
# (Checked here in a Python 3.12 venv with torch 2.11 and only that machine's packages, CPU mode: the
# wheels install and TorchCodec 0.16 decodes; DeepSpeed then JIT-compiles its CPU shm op, ~90 s, once --
# on a GPU it takes the CUDA accelerator and NCCL and compiles nothing.)
set -euo pipefail
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0

start=$SECONDS
out_json=$(realpath -m "${1:-$(mktemp -d -t gpu_check.XXXXXX)/gpu_check.json}")
[ -n "${SHARDS:-}" ] && SHARDS=$(realpath -m "$SHARDS")
cd "$(dirname "$0")/.."
repo=$PWD
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$(dirname "$out_json")"
log=${out_json%.json}.log
work=$(mktemp -d -t gpu_check_work.XXXXXX)
: > "$log"
say() { echo "[gpu_check $((SECONDS - start))s] $*" >&2; }

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import deepspeed" > /dev/null 2>&1 && [ -d .gpu/whl ]; then
  site=${GPU_CHECK_SITE:-/tmp/site}
  say "DeepSpeed missing: installing .gpu/whl/*.whl into $site"
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .gpu/whl/*.whl \
    >> "$log" 2>&1; then
    tail -20 "$log" >&2
    say "installing .gpu/whl failed (output above and in $log)"
    exit 1
  fi
  export PYTHONPATH="$site:$PYTHONPATH"
fi

case "${GPU_CHECK_MODE:-auto}" in
  auto) if [ "$("$PY" -c 'import torch; print(torch.cuda.is_available())')" = True ]; then mode=gpu; else mode=cpu-reduced; fi ;;
  gpu | cpu-reduced) mode=$GPU_CHECK_MODE ;;
  *) echo "GPU_CHECK_MODE must be auto, gpu or cpu-reduced" >&2; exit 2 ;;
esac
if [ -z "${SHARDS:-}" ]; then
  if [ -d .gpu/shards ]; then SHARDS=$repo/.gpu/shards; else SHARDS=$repo/shards/out/fonts; fi
fi
say "mode $mode, shards $SHARDS, python $PY, work $work"

# step NAME SECONDS CMD...: runs CMD with a time limit (cut to what is left of the whole run's budget); its
# output goes to WORK/NAME.log and the log file, its exit status and seconds to WORK/NAME.status. Never fails
# itself (the report judges).
budget=${GPU_CHECK_BUDGET:-450}
step() {
  local name=$1 limit=$2 t0=$SECONDS rc=0
  local left=$((budget - (SECONDS - start)))
  shift 2
  if [ "$left" -lt 10 ]; then
    say "$name: skipped, the run's budget of $budget s is spent"
    echo "out of time: the run's budget of $budget s (GPU_CHECK_BUDGET) is spent" | tee "$work/$name.log" >> "$log"
    echo "124 0" > "$work/$name.status"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "$name ..."
  timeout -k 10 "$limit" "$@" > "$work/$name.log" 2>&1 || rc=$?
  echo "$rc $((SECONDS - t0))" > "$work/$name.status"
  { echo "===== $name (exit $rc, $((SECONDS - t0)) s): $*"; cat "$work/$name.log"; echo; } >> "$log"
  say "$name: exit $rc in $((SECONDS - t0)) s"
  return 0
}
ok() { [ -f "$work/$1.status" ] && [ "$(cut -d' ' -f1 "$work/$1.status")" = 0 ]; }
skip() { echo "$2" > "$work/$1.skipped"; }

step decoder 120 "$PY" bench/gpu_check.py decoder --shim "$work/shim" --out "$work/decoder.json"
step search 60 "$PY" bench/gpu_check.py search --shim "$work/shim" --out "$work/search.json"
if [ -d "$work/shim" ]; then export PYTHONPATH="$work/shim:$PYTHONPATH"; fi

runs=$work/runs
# The smoke's held-out validation (what distpddm smoke adds): step 0 and the last step, 512 images of test/.
held_out=("data.val_shards=$SHARDS/test" data.val_max_images=512 train.val_at_start=true train.val_every=0)
train=("$PY" -m distpddm.cli train --local configs/smoke.yaml "data.train_shards=$SHARDS/train"
  "ray.storage_path=$runs" train.progress=false)
if [ "$mode" = gpu ]; then
  device=cuda min_classes=32
  gpu=(ray.use_gpu=true train.precision=bf16 train.deepspeed=configs/deepspeed/zero1_gpu.json)
  smoke=("${gpu[@]}" train.steps=300 train.log_every=10 train.checkpoint_every=100)
  tput=("${gpu[@]}" model.backbone=resnet50 data.image_size=224 model.embed_dim=128 data.classes_per_batch=32
    data.images_per_class=4 data.loader_workers=8 train.steps=100 train.log_every=5 train.checkpoint_every=100)
  warmup=30 smoke_size=32
  mining=(--device cuda --pools 8192 --dims 128) mining_pool=8192 resnet="batch 64, 224 px"
  limits=(180 180 180 120) # smoke, throughput, mining, parity: seconds (each a minute or less expected)
else
  device=cpu min_classes=8
  smoke=(train.steps=30 train.log_every=5 train.checkpoint_every=15)
  tput=(model.backbone=small_cnn data.image_size=32 data.classes_per_batch=8 data.images_per_class=4
    data.loader_workers=1 train.steps=20 train.log_every=5 train.checkpoint_every=20)
  warmup=5 smoke_size=32
  mining=(--device cpu --pools 256 --dims 128 --reps 2 --resnet-reps 1 --resnet-batch 4 --resnet-size 32)
  mining_pool=256 resnet="batch 4, 32 px"
  limits=(240 180 180 120)
fi

step parity "${limits[3]}" "$PY" bench/gpu_parity.py --device $device --out "$work/parity.json"

step shards 60 "$PY" bench/gpu_check.py shards "$SHARDS/train" --classes $min_classes --per-class 4 \
  --out "$work/shards.json"
if ok shards && [ ! -f "$SHARDS/test/index.json" ]; then
  skip smoke "no held-out split $SHARDS/test (make shards-fonts, make gpu-pack build one): learning not judged"
elif ok shards; then
  step smoke_run "${limits[0]}" "${train[@]}" name=smoke "${smoke[@]}" "${held_out[@]}"
  if ok smoke_run; then
    step smoke "${limits[3]}" "$PY" bench/gpu_check.py smoke "$runs/smoke" --device $device \
      --shards "$SHARDS/train" --image-size $smoke_size --out "$work/smoke.json"
  else skip smoke "training failed"; fi
fi
if ok shards; then
  rm -rf "$runs/smoke/checkpoints"
  step throughput_run "${limits[1]}" "${train[@]}" name=throughput "${tput[@]}"
  rm -rf "$runs/throughput/checkpoints"
  if ok throughput_run; then
    step throughput 60 "$PY" bench/gpu_check.py split "$runs/throughput" --warmup $warmup \
      --out "$work/throughput.json"
  else skip throughput "training failed"; fi
else
  skip smoke "the shards check did not pass: see shards in the JSON and the log"
  skip throughput "the shards check did not pass: see shards in the JSON and the log"
fi

step mining_run "${limits[2]}" "$PY" bench/mining.py "${mining[@]}" --out "$work/mining_raw.json"
if ok mining_run; then
  step mining 60 "$PY" bench/gpu_check.py mining "$work/mining_raw.json" --pool $mining_pool \
    --resnet "$resnet" --command-line "bench/mining.py ${mining[*]}" --out "$work/mining.json"
else skip mining "bench/mining.py failed"; fi

rc=0
"$PY" bench/gpu_check.py report "$work" --mode "$mode" --seconds $((SECONDS - start)) --out "$out_json" || rc=$?
if [ "${GPU_CHECK_KEEP:-0}" = 1 ]; then
  say "kept the runs, logs and shim in $work"
else
  rm -rf "$work"
fi
say "wrote $out_json (every step's output: $log)"
exit $rc
