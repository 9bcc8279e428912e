"""Training images/s of a config's network and loss on one device, and what its full run costs in device-hours.

Times the part of a step that runs on the accelerator: the config's backbone (random init: no download) at its
image size and per-worker P x K batch, its PDDMLoss, backward and an AdamW step, on synthetic images held on the
device. Not timed: decoding and augmenting images (the loader), the all-gather across workers, DeepSpeed;
and the miner sees one worker's batch, not the gathered one (so mining is cheaper than in a real run).
So the figure is an upper bound on a real run's rate; the device-hours assume every worker keeps that rate::

    python bench/step_rate.py configs/cub200.yaml configs/cars196.yaml --device cuda [--steps 60 --warmup 15]

Prints one JSON object per config (``--out`` appends them to a JSON-lines file).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distpddm.config import load_config  # noqa: E402
from distpddm.criterion import build_loss  # noqa: E402
from distpddm.model import create_model  # noqa: E402


def measure(config: str, device: str, steps: int, warmup: int) -> dict:
    cfg = load_config(config, check_paths=False)  # the shards need not exist: images are synthetic
    model_cfg = dataclasses.replace(cfg.model, pretrained=None)  # random weights: the rate does not depend on them
    precision = cfg.train.precision if device.startswith("cuda") else "fp32"
    model = create_model(model_cfg, precision).to(device)
    loss_fn = build_loss(cfg).to(device)
    params = [*model.parameters(), *loss_fn.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    p, k, size = cfg.data.classes_per_batch, cfg.data.images_per_class, cfg.data.image_size
    batch = p * k
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, model_cfg.in_channels, size, size, device=device, generator=gen)
    y = torch.arange(p, device=device).repeat_interleave(k)
    model.train()

    def step() -> None:
        loss, _ = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - start
    rate = batch * steps / seconds
    workers = cfg.ray.num_workers
    images = cfg.train.steps * batch * workers  # every worker takes its own P x K batch per step
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    return {
        "config": config, "device": name, "backbone": model_cfg.backbone, "image_size": size, "batch": batch,
        "precision": precision, "steps_timed": steps, "warmup": warmup, "images_per_s": round(rate, 1),
        "ms_per_step": round(1000 * seconds / steps, 2), "run_steps": cfg.train.steps, "workers": workers,
        "run_images": images, "device_hours": round(images / rate / 3600, 3),
        "wall_hours_on_workers": round(images / rate / 3600 / workers, 3),
        "not_timed": "image decoding and augmentation, the cross-worker gather, DeepSpeed; mining here is over one "
        "worker's batch, not the gathered batch of all workers (cheaper)",
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    for config in args.configs:
        r = measure(config, args.device, args.steps, args.warmup)
        print(json.dumps(r), flush=True)
        if args.out:
            with args.out.open("a") as f:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
