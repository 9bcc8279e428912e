"""``distpddm submit``: a training run as a Ray Job on a running cluster (``ray job submit`` without the traps).

The config is loaded and validated here first, so a bad one fails with its :class:`ConfigError` line and
nothing is submitted. Its paths are resolved here (:func:`distpddm.config.load_config`'s rule) and sent
absolute: shards, ``ray.storage_path`` and ``model.pretrained`` must be visible at the same path on the
cluster (a head on this machine, or shared storage). The resolved config and its DeepSpeed JSON travel with
the job, in ``.distpddm-job/`` of the working directory: the source checkout this module belongs to, zipped by
Ray's own packer without bulk (:data:`EXCLUDES`; ``.gitignore`` applies as well). The zip's size is printed
before it is uploaded. Only the source travels: the cluster's nodes must have the package's dependencies
(torch, DeepSpeed, Ray, webdataset...) installed, as ``pip install``-ing them per job would take minutes.

The job's id is printed, its logs are followed and the exit code is the job's (0 succeeded, 1 failed or
stopped); ``--no-wait`` returns once it is submitted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

import yaml

from .config import ConfigError, RunConfig, load_config

JOB_DIR = ".distpddm-job"  # in the job's working directory: config.yaml and deepspeed.json
# gitwildmatch patterns (relative to the checkout), on top of .gitignore and Ray's defaults (.git, .venv...).
EXCLUDES = [
    ".git/", ".venv/", "venv/", "__pycache__/", "*.egg-info/", ".pytest_cache/", ".ruff_cache/", "build/",
    "/shards/out/", "/runs/", "/.gpu/", "/.whl/", f"/{JOB_DIR}/", "/experiments/",  # the study: not the product
    "*.tar", "*.tar.gz", "*.zip", "*.whl", "*.npz", "*.npy", "*.pt", "*.pth", "*.ckpt", "events.out.tfevents.*",
]  # fmt: skip


def checkout() -> Path:
    """The source checkout to ship: the folder holding this package and its pyproject.toml."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise ConfigError(
            f"distpddm submit ships the source checkout it runs from, and {root} is not one (an installed "
            "package): run it from a clone of the repository (pip install -e .)"
        )
    return root


def job_files(cfg: RunConfig) -> dict[str, bytes]:
    """The resolved config and its DeepSpeed JSON, which the config names relative to itself."""
    tree = cfg.to_dict()
    tree["train"]["deepspeed"] = "deepspeed.json"
    return {
        "config.yaml": yaml.safe_dump(tree, sort_keys=False).encode(),
        "deepspeed.json": Path(cfg.train.deepspeed).read_bytes(),
    }


def package(root: Path, files: dict[str, bytes], dest: Path) -> Path:
    """The working directory as Ray packs it (its ``create_package``, with its default excludes and
    ``.gitignore``), plus ``files`` in :data:`JOB_DIR`. A local zip is uploaded to the cluster as it is."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    excludes = ray_constants.get_runtime_env_default_excludes() + EXCLUDES
    quiet = logging.getLogger("distpddm.submit.package")  # not one INFO line per .gitignore found
    quiet.setLevel(logging.WARNING)
    create_package(str(root), dest, include_gitignore=include_gitignore, excludes=excludes, logger=quiet)
    with zipfile.ZipFile(dest, "a") as z:
        for name, data in files.items():
            z.writestr(f"{JOB_DIR}/{name}", data)
    return dest


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    try:  # a cluster started with token authentication: use the local token as `ray.init` would
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    except ImportError:  # a Ray without token authentication
        pass
    return JobSubmissionClient(address)


async def _follow(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def wait_for(client, job_id: str, poll_s: float = 1.0) -> int:
    """Follow the job's logs to its end; 0 if it succeeded, 1 if it failed or was stopped."""
    from ray.job_submission import JobStatus

    asyncio.run(_follow(client, job_id))
    status = client.get_job_status(job_id)
    while not status.is_terminal():  # the log stream can close a moment before the status is final
        time.sleep(poll_s)
        status = client.get_job_status(job_id)
    message = client.get_job_info(job_id).message or ""
    print(f"job {job_id}: {status.value}" + (f" ({message})" if message and status != JobStatus.SUCCEEDED else ""))
    return 0 if status == JobStatus.SUCCEEDED else 1


def submit(config: str | os.PathLike, overrides: list[str], address: str | None, wait: bool = True) -> int:
    """Validate, package, submit, and (``wait``) follow; the exit code of ``distpddm submit``."""
    try:
        cfg = load_config(config, overrides)
        root = checkout()
        files = job_files(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"config: {cfg.name}; shards {cfg.data.train_shards}; output {cfg.output_location()}")
    with tempfile.TemporaryDirectory(prefix="distpddm-submit-") as tmp:
        zipped = package(root, files, Path(tmp) / f"{cfg.name}-{uuid.uuid4().hex[:8]}.zip")
        with zipfile.ZipFile(zipped) as z:
            count = len(z.namelist())
        size = zipped.stat().st_size
        print(f"working dir: {root} -> {count} files, {size / 2**20:.2f} MiB zipped (upload size)")
        try:
            client = _client(address)
            job_id = client.submit_job(
                entrypoint=f"python -m distpddm.cli train {JOB_DIR}/config.yaml",
                submission_id=f"distpddm-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}",
                runtime_env={"working_dir": str(zipped), "env_vars": {"PYTHONUNBUFFERED": "1"}},
                metadata={"distpddm_config": str(Path(config).resolve()), "distpddm_name": cfg.name},
            )
        except (ConnectionError, RuntimeError, ValueError) as e:  # what the client raises: unreachable, refused
            print(f"error: submission to {address or os.environ.get('RAY_ADDRESS', 'the local cluster')} failed: {e}",
                  file=sys.stderr)  # fmt: skip
            return 1
    where = f" --address {address}" if address else ""
    print(f"job id: {job_id}")
    if not wait:
        print(f"follow it with `ray job logs -f {job_id}{where}`; stop it with `ray job stop {job_id}{where}`")
        return 0
    try:
        return wait_for(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on (`ray job stop {job_id}{where}` ends it)", file=sys.stderr)
        return 130
