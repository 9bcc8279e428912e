# Everything a fresh machine needs: `make demo` and `make test` create .venv and install on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FONTS_DIR := /usr/share/fonts/truetype/aenigma
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: install fonts test test-fast demo demo-core shards-fonts lint format bench-mining bench-losses bench-builder rehearsal clean

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

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The main job end to end: glyph shards -> Ray Train (2 workers) + DeepSpeed -> held-out Recall@K.
demo: shards-fonts
	rm -rf runs/fonts-demo
	RAY_USAGE_STATS_ENABLED=0 $(PY) -m distpddm.cli train configs/fonts.yaml name=fonts-demo

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

bench-builder: install
	$(PY) bench/builder.py

# ImageNet-10K's shape on this machine: 10,000 long-tailed classes -> shards (val + held-out classes) ->
# Ray training with 2 workers -> held-out validation; each stage's time and peak memory (bench/rehearsal.py).
rehearsal: install
	$(PY) bench/rehearsal.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
