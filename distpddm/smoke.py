"""``distpddm smoke``: one device, ``configs/smoke.yaml``, a few hundred steps through the real trainer
(``--local``: DeepSpeed, the P x K stream, PDDMLoss, checkpoints, export; 16 classes x 4 images per step),
then three checks a user can read: images/s, that the loss fell, and that the exported ``model.pt`` loads
and embeds real images.

On a GPU it runs bf16 (``train.precision=bf16``, ``configs/deepspeed/zero1_gpu.json``), on a CPU fp32, and
it says which. ``launch/smoke.sh`` / ``make smoke`` wrap it.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

import yaml

from .config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the checkout's
# Classes per step (x smoke.yaml's 4 images): with 8 the from-scratch loss was still at its collapsed value
# after 175 steps; with 16 it fell within 400 (configs/smoke.yaml). An override still wins.
SMOKE_MARK = ".distpddm-smoke"  # in a smoke's run folder: the only kind of folder a smoke deletes
SMOKE_CLASSES = 16


def check_run(run: Path, warmup_rows: int = 1) -> dict:
    """What the smoke reports from a finished run folder: mean images/s after the first ``warmup_rows`` logged
    rows; the mean of the first and of the last few logged losses (a third of the rows, at most 3; one row is
    too noisy with P x K batches); whether the exported model loads and embeds the split's first images."""
    import torch

    from .data.evalset import EvalDataset
    from .data.transforms import normalize_batch
    from .model import load_exported

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    losses = [float(r["loss"]) for r in rows]
    n = max(1, min(3, len(losses) // 3))
    first = sum(losses[:n]) / n if losses else math.nan
    last = sum(losses[-n:]) / n if losses else math.nan
    timed = [float(r["images_per_s"]) for r in rows[warmup_rows:] if "images_per_s" in r] or [
        float(r["images_per_s"]) for r in rows if "images_per_s" in r
    ]
    result = {
        "steps": int(rows[-1]["step"]) if rows else 0,
        "logged": len(rows),
        "images_per_s": sum(timed) / len(timed) if timed else math.nan,
        "loss_first": first,
        "loss_last": last,
        "loss_fell": len(losses) >= 2 and all(math.isfinite(x) for x in losses) and last < first,
    }
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    loss = cfg.get("loss") or {}
    if {"alpha", "beta", "lam"} <= loss.keys():  # every distance and score equal: docs/collapse.md
        result["loss_collapsed"] = 2 * loss["alpha"] + 2 * loss["lam"] * loss["beta"]
    spreads = [float(r["spread"]) for r in rows[-n:] if "spread" in r]
    if spreads:
        result["spread_last"] = sum(spreads) / len(spreads)
    try:
        model = load_exported(run / "model.pt")
        images = [x for x, *_ in EvalDataset(cfg["data"]["train_shards"], cfg["data"]["image_size"], limit=8)]
        with torch.no_grad():
            emb = model(normalize_batch(torch.stack(images)))
        result["export_loads"] = bool(emb.shape == (len(images), model.cfg.embed_dim) and torch.isfinite(emb).all())
        result["export_embedding"] = list(emb.shape)
    except Exception as e:  # reported, not raised: the smoke says what failed
        result["export_loads"] = False
        result["export_error"] = f"{type(e).__name__}: {e}"
    return result


def smoke(
    config: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    steps: int = 400,
    out: str | Path | None = None,
    device: str = "auto",
) -> int:
    """Train, check, print; 0 when the loss fell and the export loads, 1 otherwise, 2 for a bad config."""
    import torch

    gpu = device == "gpu" or (device == "auto" and torch.cuda.is_available())
    if gpu and not torch.cuda.is_available():
        print("error: --device gpu but torch sees no CUDA device", file=sys.stderr)
        return 2
    mode = "GPU, bf16 backbone (heads, loss and master weights fp32)" if gpu else "CPU, fp32"
    storage = Path(out) if out else Path(tempfile.mkdtemp(prefix="distpddm-smoke-"))
    storage.mkdir(parents=True, exist_ok=True)
    precision = (
        ["ray.use_gpu=true", "train.precision=bf16", f"train.deepspeed={CONFIGS / 'deepspeed' / 'zero1_gpu.json'}"]
        if gpu
        else ["ray.use_gpu=false", "train.precision=fp32"]
    )
    fixed = [f"train.steps={steps}", f"train.checkpoint_every={steps}", "train.progress=false", "ray.num_workers=1",
             f"data.classes_per_batch={SMOKE_CLASSES}"]  # fmt: skip
    try:
        cfg = load_config(
            config or CONFIGS / "smoke.yaml", [*fixed, *precision, f"ray.storage_path={storage}", *(overrides or [])]
        )
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = Path(cfg.output_location())
    print(f"smoke: {mode}; {cfg.train.steps} steps of {cfg.local_batch} images; shards {cfg.data.train_shards}")
    if run.exists() and not (run / SMOKE_MARK).is_file():
        print(
            f"error: {run} exists and is not a smoke run (no {SMOKE_MARK}): a smoke replaces its own folder "
            "only; give another --out",
            file=sys.stderr,
        )
        return 2
    try:
        from .train.launch import train_local

        if run.exists():  # a smoke starts from scratch: never resumes (nor appends to) an earlier smoke
            shutil.rmtree(run)
        run.mkdir(parents=True)
        (run / SMOKE_MARK).write_text("a distpddm smoke run: the next smoke with this --out replaces it\n")
        train_local(cfg)
        result = check_run(run)
    finally:
        if not out:
            shutil.rmtree(storage, ignore_errors=True)
    ok = result["loss_fell"] and result["export_loads"]
    print(f"smoke: {mode}: {result['images_per_s']:.0f} images/s (mean over the logged steps after the first)")
    print(
        f"smoke: loss {result['loss_first']:.4f} -> {result['loss_last']:.4f} "
        f"({'fell' if result['loss_fell'] else 'DID NOT FALL'}; mean of the first / last logged values)"
    )
    if not result["loss_fell"] and "loss_collapsed" in result:
        print(
            f"smoke: a collapsed embedding's loss is {result['loss_collapsed']:.4f} and the last embedding spread "
            f"{result.get('spread_last', math.nan):.2f} (about 0.1-0.2 = collapsed): from random initialisation "
            "it needs more steps or a larger batch (docs/collapse.md)"
        )
    export = (
        f"loads and embeds {result['export_embedding']}"
        if result["export_loads"]
        else f"FAILED: {result.get('export_error', 'bad embeddings')}"
    )
    print(f"smoke: exported model.pt {export}")
    print(f"smoke: {'PASSED' if ok else 'FAILED'}" + (f"; run folder {run}" if out else ""))
    return 0 if ok else 1
