"""``distpddm smoke``: one device, ``configs/smoke.yaml``, a few hundred steps through the real trainer
(``--local``: DeepSpeed, the P x K stream, PDDMLoss, checkpoints, export; 16 classes x 4 images per step),
then what a user can read: images/s, whether it learned, and whether the exported ``model.pt`` loads and
embeds real images. "Learned" is judged on held-out classes: Recall@1 on the first ``data.val_max_images``
images of ``data.val_shards`` (default: the ``test`` split beside the train shards, as ``make shards-fonts``
builds it) at the end against the untrained network's at step 0. The training loss is not the verdict: with
hard mining each batch's hardest pairs get harder as the embedding improves, so it need not fall (0.260 ->
0.290 over 30 steps of a run whose embedding improved). Only without held-out classes does the smoke fall back
to the loss, and it says so.

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
# Held-out images validated at step 0 and at the end when the config caps none: a few seconds on one CPU, and
# the fonts test split is stored in chunks of 8 glyphs of a font (the builder's default), so 512 images hold
# about 60 unseen classes.
SMOKE_VAL_IMAGES = 512


def held_out_split(train_shards: str) -> Path | None:
    """The ``test`` split beside a local train split (``shards build`` writes both; its classes are disjoint)."""
    if not train_shards or "://" in train_shards or train_shards.startswith("pipe:"):
        return None
    test = Path(train_shards).parent / "test"
    return test if (test / "index.json").is_file() and test != Path(train_shards) else None


def judge_recall(rows: list[dict]) -> dict:
    """Held-out Recall@1 of the untrained network (the step-0 validation) and of the last validated step, from
    ``metrics.jsonl`` rows; ``learned`` only when both are finite and it rose by more than ``noise``, one
    standard error of the step-0 figure on that many images (a rise of a few images is chance, not learning;
    the same images both times, so one is enough; the smoke's real rises are ten times that: configs/smoke.yaml).
    Empty without both."""
    recall = {int(r["step"]): float(r["val_recall@1"]) for r in rows if "val_recall@1" in r and "step" in r}
    last = max(recall, default=0)
    if 0 not in recall or last == 0:
        return {}
    start, end = recall[0], recall[last]
    images = [r.get("val_images") for r in rows if int(r.get("step", -1)) == last and "val_images" in r]
    n = int(images[-1]) if images else None
    noise = math.sqrt(start * (1 - start) / n) if n and math.isfinite(start) and 0 <= start <= 1 else 0.0
    return {
        "recall1_start": start,
        "recall1_end": end,
        "recall1_step": last,
        "val_images": n,
        "recall1_noise": noise,
        "learned": math.isfinite(start) and math.isfinite(end) and end > start + noise,
    }


def _verdict(result: dict) -> str:
    if result["learned"]:
        return "rose: learned"
    if result["recall1_end"] > result["recall1_start"]:
        return f"DID NOT RISE beyond the noise of {result['recall1_noise']:.3f}: not learned"
    return "DID NOT RISE: not learned"


def check_run(run: Path, warmup_rows: int = 1) -> dict:
    """What the smoke reports from a finished run folder: mean images/s after the first ``warmup_rows`` logged
    rows; ``learned``, the verdict: held-out Recall@1 rose from step 0 (:func:`judge_recall`; ``judged_by``
    "held-out Recall@1"), or, where the run validated no held-out classes at step 0 and later, the fallback
    ``loss_fell`` (``judged_by`` "training loss"); the mean of the first and of the last few logged losses (a
    third of the rows, at most 3; one row is too noisy with P x K batches), reported either way; whether the
    exported model loads and embeds the split's first images."""
    import torch

    from .data.evalset import EvalDataset
    from .data.transforms import normalize_batch
    from .model import load_exported

    every = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in every if "loss" in r]
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
    held_out = judge_recall(every)
    if held_out:
        result |= held_out | {"judged_by": "held-out Recall@1"}
    else:
        result |= {"judged_by": "training loss", "learned": result["loss_fell"]}
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    result["val_shards"] = (cfg.get("data") or {}).get("val_shards")
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
    """Train, check, print; 0 when it learned (held-out Recall@1 rose from step 0; without held-out classes, the
    loss fell) and the export loads, 1 otherwise, 2 for a bad config. Held-out classes: ``data.val_shards``,
    else the train shards' sibling ``test`` split; validated at step 0 (``train.val_at_start`` forced on: the
    verdict needs it) and at the end, on ``SMOKE_VAL_IMAGES`` images unless ``data.val_max_images`` is set."""
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
             f"data.classes_per_batch={SMOKE_CLASSES}", f"ray.storage_path={storage}"]  # fmt: skip
    path, given = config or CONFIGS / "smoke.yaml", [*fixed, *precision, *(overrides or [])]
    try:
        probe = load_config(path, [*given, "train.val_every=0"])  # val_every may need the split added below
        sibling = None if probe.data.val_shards else held_out_split(probe.data.train_shards)
        held = [f"data.val_shards={sibling}"] if sibling else []
        if probe.data.val_shards or sibling:
            held += [] if probe.data.val_max_images else [f"data.val_max_images={SMOKE_VAL_IMAGES}"]
            held += ["train.val_at_start=true"]
        cfg = load_config(path, [*given, *held])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = Path(cfg.output_location())
    print(f"smoke: {mode}; {cfg.train.steps} steps of {cfg.local_batch} images; shards {cfg.data.train_shards}")
    if cfg.data.val_shards:
        origin = "the train shards' sibling test split" if sibling else "data.val_shards"
        print(
            f"smoke: held-out classes {cfg.data.val_shards} ({origin}): Recall@1 on its first "
            f"{cfg.data.val_max_images or 'all'} images at step 0 (untrained) and step {cfg.train.steps}: the verdict"
        )
    else:
        print(
            f"smoke: no held-out split (data.val_shards unset, no test split beside {cfg.data.train_shards}): "
            "learning cannot be judged on held-out classes; FALLING BACK to the training loss as the verdict "
            "(weak: with hard mining it need not fall)"
        )
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
    ok = result["learned"] and result["export_loads"]
    print(f"smoke: {mode}: {result['images_per_s']:.0f} images/s (mean over the logged steps after the first)")
    loss = f"smoke: loss {result['loss_first']:.4f} -> {result['loss_last']:.4f} (means of the first / last logged"
    if result["judged_by"] == "held-out Recall@1":
        print(
            f"smoke: held-out Recall@1 {result['recall1_start']:.3f} at step 0 -> {result['recall1_end']:.3f} at step "
            f"{result['recall1_step']} on {result['val_images']} images "
            f"({_verdict(result)})"
        )
        print(f"{loss}; information, not the verdict)")
    else:
        if cfg.data.val_shards:
            print("smoke: no held-out Recall@1 at step 0 and later in metrics.jsonl: FALLING BACK to the training loss")
        print(f"{loss}; the fallback verdict: {'fell' if result['loss_fell'] else 'DID NOT FALL'})")
    if not result["learned"] and "loss_collapsed" in result:
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
