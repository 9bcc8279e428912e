"""Loader throughput: distpddm's shard reader against torchvision ImageFolder on the same real images.

Images: crops of the real photographs that scikit-learn ships (``load_sample_images``), saved as
ImageNet-sized JPEGs (about 500 x 375, quality 90) in class folders. The same work for every reader:
decode + RandomResizedCrop(224) + horizontal flip + normalise, batches of 64, 1 and 2 loader workers.
ImageFolder uses the usual torchvision v2 recipe on each PIL image, normalised in its workers; distpddm's
reader its own path (crop drawn from the header, reduced-size JPEG decoding when the crop allows, uint8
resize, uint8 batches between processes), normalised per batch in the consuming process -- on the CPU here,
inside the timed loop (a trainer does it on the GPU).
Readers: ``PKBatchDataset`` on shards of the original bytes, on ``--max-side 320`` shards, and
``ImageFolder`` + ``DataLoader`` on the folder. Also reports bytes per image and shard build throughput::

    python bench/loader.py [--images 1200] [--batches 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distpddm.data.shards import BuildOptions, build  # noqa: E402
from distpddm.data.sources import read_source  # noqa: E402
from distpddm.data.stream import PKBatchDataset  # noqa: E402
from distpddm.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_batch  # noqa: E402


def make_images(root: Path, n: int, classes: int = 40, seed: int = 0) -> None:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]  # 2 real photographs, 640 x 427
    rng = np.random.default_rng(seed)
    for i in range(n):
        photo = photos[i % len(photos)].resize((1000, 667), Image.BICUBIC)
        w, h = int(rng.integers(420, 640)), int(rng.integers(320, 480))
        x, y = int(rng.integers(0, 1000 - w)), int(rng.integers(0, 667 - h))
        img = photo.crop((x, y, x + w, y + h)).resize((500, 375), Image.BICUBIC)
        out = root / f"c{i % classes:03d}" / f"{i:05d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(out, quality=90)


def throughput(loader, batches: int) -> float:
    """Images/s arriving as normalised float batches in the consuming process (the trainer's view)."""
    it = iter(loader)
    next(it)  # workers started, first batch ready
    start = time.perf_counter()
    n, buffer = 0, None
    for _ in range(batches):
        x, _ = next(it)[:2]
        if x.dtype == torch.uint8:  # distpddm normalises on the training device; here, the CPU, counted,
            x = buffer = normalize_batch(x, out=buffer)  # into one reused buffer, as a GPU's allocator would
        n += len(x)
    del it  # stop the workers before the next reader starts
    return n / (time.perf_counter() - start)


def shard_loader(split_dir: Path, workers: int):
    ds = PKBatchDataset(
        split_dir,
        classes_per_batch=16,
        images_per_class=4,
        image_size=224,
    )
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)


def folder_loader(root: Path, workers: int):
    import torchvision
    from torchvision.transforms import v2

    recipe = v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(224, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    ds = torchvision.datasets.ImageFolder(str(root), transform=recipe)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10**7)
    return torch.utils.data.DataLoader(ds, batch_size=64, sampler=sampler, num_workers=workers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1200)
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_images(tmp / "src", args.images)
        src_bytes = sum(f.stat().st_size for f in (tmp / "src").rglob("*.jpg"))
        plan = read_source("folder", tmp / "src")
        rows = {}
        for name, max_side in (("original", None), ("max-side 320", 320)):
            start = time.perf_counter()
            index = build(plan, tmp / name, BuildOptions(shard_bytes=8 * 2**20, max_side=max_side, progress=False))
            seconds = time.perf_counter() - start
            total = sum(s["bytes"] for s in index["train"]["shards"])
            rows[name] = {"bytes_per_image": total / args.images, "build_img_s": args.images / seconds}
        print(f"{args.images} JPEGs of 500 x 375 from real photographs, {src_bytes / args.images / 1024:.1f} KiB each")
        for name, r in rows.items():
            print(
                f"shards ({name}): {r['bytes_per_image'] / 1024:.1f} KiB per image (with tar headers), "
                f"built at {r['build_img_s']:.0f} images/s"
            )
        readers = {"torchvision ImageFolder + DataLoader": lambda w: folder_loader(tmp / "src", w)}
        for name in rows:
            readers[f"distpddm PKBatchDataset, {name} shards"] = lambda w, d=tmp / name / "train": shard_loader(d, w)
        print(f"\nmedian of {args.repeats} runs, readers interleaved within each run")
        print("\n| reader | loader workers | images/s (runs) | vs ImageFolder |")
        print("|---|---|---|---|")
        for workers in (1, 2):
            runs = {name: [] for name in readers}
            for _ in range(args.repeats):
                for name, make in readers.items():
                    runs[name].append(throughput(make(workers), args.batches))
            base = float(np.median(runs["torchvision ImageFolder + DataLoader"]))
            for name, r in runs.items():
                med = float(np.median(r))
                each = ", ".join(f"{v:.0f}" for v in r)
                print(f"| {name} | {workers} | {med:.0f} ({each}) | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
