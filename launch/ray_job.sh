#!/usr/bin/env bash
# Submit a training run to a running Ray cluster as a Ray Job (`distpddm submit`, distpddm/submit.py):
#   RAY_ADDRESS=http://head:8265 launch/ray_job.sh configs/imagenet10k.yaml [section.key=value ...] [--no-wait]
# The config is validated here (a bad one is refused before anything is submitted) and its paths are resolved
# here and sent absolute: shards and ray.storage_path must be visible at the same path on the cluster (a head
# on this machine, or shared storage). This checkout's source is shipped without bulk; the job's logs are
# followed and the exit code is the job's. Run it from any folder: it does not change directory.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PY:-}" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then PY=$repo/.venv/bin/python; else PY=python3; fi
fi
PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m distpddm.cli submit "$@"
