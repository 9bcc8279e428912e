#!/usr/bin/env bash
# Submit a training run to a running Ray cluster (multi-node): the job runs `distpddm train` on the head.
#   RAY_ADDRESS=http://head:8265 launch/ray_job.sh configs/imagenet10k.yaml [section.key=value ...]
# The working directory (this repository) is shipped with the job; shards and ray.storage_path must be on
# storage every node can read (shared filesystem or object store).
set -euo pipefail
config=${1:?usage: launch/ray_job.sh CONFIG [overrides...]}; shift
cd "$(dirname "$0")/.."
exec ray job submit --working-dir . -- python -m distpddm.cli train "$config" "$@"
