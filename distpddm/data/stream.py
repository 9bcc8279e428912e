"""Streaming readers over WebDataset shards: P x K training batches and exactly-once evaluation.

Both split shards by node (the Ray / DeepSpeed rank, from torch.distributed or RANK / WORLD_SIZE) and by
DataLoader worker. Bad samples (an image that does not decode, a missing label) and unreadable shards are
skipped with a warning naming shard and key, and counted; past ``max_skip_rate`` the run stops with
:class:`BadDataError` rather than training on quietly shrinking data.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .shards import INDEX

log = logging.getLogger("distpddm.data")
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class BadDataError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------- shard lists


@dataclass(frozen=True)
class ShardSet:
    urls: list[str]
    classes: list[str] | None
    samples: int | None


def resolve_shards(spec: str | Path) -> ShardSet:
    """A split folder (or its ``index.json``, local or any fsspec URL), or a webdataset URL pattern."""
    spec = str(spec)
    if Path(spec).is_dir():
        spec = str(Path(spec) / INDEX)
    if spec.endswith(".json"):
        import fsspec

        with fsspec.open(spec, "r") as f:
            index = json.load(f)
        base = spec.rsplit("/", 1)[0] if "/" in spec else "."
        return ShardSet([f"{base}/{s['name']}" for s in index["shards"]], index["classes"], index["samples"])
    import webdataset as wds

    urls = wds.shardlists.expand_urls(spec)
    if not urls:
        raise FileNotFoundError(f"no shards match {spec!r}")
    return ShardSet(urls, None, None)


# ------------------------------------------------------------------------------------------------ bad data


class SkipCounter:
    """Counts good and skipped samples in one worker; raises past the skip-rate threshold."""

    def __init__(self, max_skip_rate: float = 0.01, min_samples: int = 200):
        if not 0 <= max_skip_rate <= 1:
            raise ValueError(f"max_skip_rate must be in [0, 1], got {max_skip_rate}")
        self.max_skip_rate, self.min_samples = max_skip_rate, min_samples
        self.seen = self.skipped = 0
        self.last: list[str] = []

    def ok(self) -> None:
        self.seen += 1

    def skip(self, where: str, why: str) -> None:
        self.seen += 1
        self.skipped += 1
        self.last = (self.last + [f"{where} ({why})"])[-5:]
        log.warning("skipping %s: %s", where, why)
        self.check()

    def check(self) -> None:
        if self.seen >= self.min_samples and self.skipped > self.max_skip_rate * self.seen:
            raise BadDataError(
                f"{self.skipped} of {self.seen} samples skipped ({100 * self.skipped / self.seen:.1f}%), above "
                f"max_skip_rate={self.max_skip_rate:.2%}; last: {'; '.join(self.last)}. Verify the shards with "
                "`distpddm shards verify`, or raise data.max_skip_rate if this loss is acceptable."
            )


def _where(sample: dict) -> str:
    return f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"


def _shard_error_handler(counter: SkipCounter) -> Callable[[Exception], bool]:
    def handler(exn: Exception) -> bool:
        counter.skip("shard", f"{type(exn).__name__}: {exn}")
        return True  # keep going with the next shard / sample

    return handler


# ------------------------------------------------------------------------------------------------ decoding


def decode_image(data: bytes, target: int | None = None):
    """PIL RGB image; JPEGs much larger than ``target`` are decoded at a reduced scale (1/2 .. 1/8)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if target is not None and img.format == "JPEG":
        img.draft("RGB", (target, target))  # keeps both sides >= target
    img = img.convert("RGB")
    img.load()
    return img


class TrainCrop:
    """RandomResizedCrop + horizontal flip done by PIL on the decoded image -- crop and antialiased resize in
    one C call -- returning a ``uint8`` (3, S, S) tensor; :func:`normalize_batch` then converts a whole batch
    at once. Same distribution of crops as torchvision's ``RandomResizedCrop`` (its ``get_params``), several
    times cheaper than converting the full image to a tensor first.
    """

    def __init__(self, size: int, crop_scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: bool = True):
        self.size, self.scale, self.ratio, self.hflip = size, tuple(crop_scale), tuple(ratio), hflip

    def __call__(self, img) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms import RandomResizedCrop

        top, left, h, w = RandomResizedCrop.get_params(img, self.scale, self.ratio)
        img = img.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + w, top + h))
        if self.hflip and torch.rand(()) < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize_batch(x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """``uint8`` (N, 3, H, W) -> float, ``(x / 255 - mean) / std`` in one pass."""
    scale = 1.0 / (255.0 * torch.tensor(std))
    shift = torch.tensor(mean) / torch.tensor(std)
    return x.float().mul_(scale[:, None, None]).sub_(shift[:, None, None])


def train_transform(size: int, crop_scale=(0.08, 1.0), hflip: bool = True) -> TrainCrop:
    return TrainCrop(size, crop_scale=crop_scale, hflip=hflip)


def eval_transform(size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize_ratio: float = 256 / 224):
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(int(round(size * resize_ratio)), antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


def _label(sample: dict) -> int:
    return int(sample["cls"])


def _image_bytes(sample: dict) -> bytes:
    for k in IMAGE_KEYS:
        if k in sample:
            return sample[k]
    raise KeyError("no image field")


# ------------------------------------------------------------------------------------- P x K batch forming


def pk_batches(
    samples: Iterator[dict], P: int, K: int, buffer_images: int, counter: SkipCounter, rng: random.Random
) -> Iterator[list[dict]]:
    """Group a stream of raw samples into batches of P distinct classes x K samples.

    Holds at most ``buffer_images`` raw (encoded) samples: per-class lists in arrival order. A class is
    *ready* with K samples; a batch takes P ready classes at random once ``2 P`` are ready (or the buffer is
    full). When full with too few ready classes, the oldest incomplete class is dropped (not an error: with
    class-contiguous chunks of >= K this is rare). Memory is O(buffer_images), never O(classes).
    """
    if buffer_images < P * K:
        raise ValueError(f"buffer_images ({buffer_images}) must hold at least one batch (P x K = {P * K})")
    pending: OrderedDict[int, list[dict]] = OrderedDict()
    ready: set[int] = set()
    held = 0

    def take() -> list[dict]:
        nonlocal held
        batch = []
        for c in rng.sample(sorted(ready), P):
            group = pending[c]
            batch += group[:K]
            del group[:K]
            held -= K
            if len(group) < K:
                ready.discard(c)
            if not group:
                del pending[c]
        return batch

    for sample in samples:
        try:
            label = _label(sample)
            _image_bytes(sample)
        except (KeyError, ValueError) as e:
            counter.skip(_where(sample), f"missing or bad label/image: {e}")
            continue
        counter.ok()
        pending.setdefault(label, []).append(sample)
        held += 1
        if len(pending[label]) >= K:
            ready.add(label)
        while len(ready) >= 2 * P or (held >= buffer_images and len(ready) >= P):
            yield take()
        while held > buffer_images:
            victim = next((c for c in pending if c not in ready), None)
            if victim is None:
                break
            held -= len(pending.pop(victim))
    while len(ready) >= P:  # a finite stream: what is left that still makes whole batches
        yield take()


class PKBatchDataset(torch.utils.data.IterableDataset):
    """Endless P x K training batches ``(images (P*K, 3, S, S), labels (P*K,))`` from shards.

    Shards are resampled with a per-rank, per-worker seed (epochs via resampling), so every rank and worker
    streams differently without coordination. Use with ``DataLoader(ds, batch_size=None, num_workers=n)``.
    """

    def __init__(
        self,
        urls: list[str],
        classes_per_batch: int,
        images_per_class: int,
        image_size: int = 224,
        buffer_images: int | None = None,
        max_skip_rate: float = 0.01,
        seed: int = 0,
        transform: Callable | None = None,
        decode_target: int | None = None,
    ):
        super().__init__()
        if images_per_class < 2:
            raise ValueError(f"images_per_class must be >= 2, got {images_per_class}")
        if classes_per_batch < 2:
            raise ValueError(f"classes_per_batch must be >= 2, got {classes_per_batch}")
        self.urls, self.P, self.K = list(urls), classes_per_batch, images_per_class
        self.buffer_images = buffer_images or 8 * classes_per_batch * images_per_class
        self.max_skip_rate, self.seed = max_skip_rate, seed
        self.transform = transform or train_transform(image_size)
        self.decode_target = decode_target if decode_target is not None else image_size

    def __iter__(self):
        import webdataset as wds

        rank, world, worker, workers = wds.utils.pytorch_worker_info()
        counter = SkipCounter(self.max_skip_rate)
        rng = random.Random(hash((self.seed, rank, worker)) & 0xFFFFFFFF)
        # Resampled: every (rank, worker) draws shards independently with a seed of its own
        # (webdataset's pytorch_worker_seed), so no node or worker splitting is wanted.
        ds = wds.WebDataset(
            self.urls,
            resampled=True,
            shardshuffle=False,
            seed=self.seed,
            nodesplitter=None,
            workersplitter=None,
            handler=_shard_error_handler(counter),
            empty_check=False,
        )
        for batch in pk_batches(iter(ds), self.P, self.K, self.buffer_images, counter, rng):
            out = self._decode(batch, counter)
            if out is not None:
                yield out

    def _decode(self, batch: list[dict], counter: SkipCounter):
        images, labels, good_by_class = [], [], {}
        for sample in batch:
            try:
                img = self.transform(decode_image(_image_bytes(sample), self.decode_target))
            except Exception as e:  # noqa: BLE001 -- any decoder failure is a bad sample
                counter.skip(_where(sample), f"image does not decode ({type(e).__name__}: {e})")
                img = None
            images.append(img)
            labels.append(_label(sample))
            if img is not None:
                good_by_class.setdefault(labels[-1], []).append(img)
        for n, img in enumerate(images):
            if img is None:  # keep the P x K shape: reuse another image of the same class
                same = good_by_class.get(labels[n])
                if not same:
                    return None
                images[n] = same[n % len(same)]
        x = torch.stack(images)
        return (normalize_batch(x) if x.dtype == torch.uint8 else x), torch.tensor(labels, dtype=torch.long)


class EvalDataset(torch.utils.data.IterableDataset):
    """Every sample exactly once across ranks and workers: ``(image, label, index)`` per sample.

    Shards are split by node then by worker, never shuffled; ``index`` is the sample's position in the split
    (from its key), so gathered results can be put back in order (:func:`restore_order`).
    """

    def __init__(
        self,
        urls: list[str],
        image_size: int = 224,
        max_skip_rate: float = 0.01,
        transform: Callable | None = None,
        decode_target: int | None = None,
    ):
        super().__init__()
        self.urls, self.max_skip_rate = list(urls), max_skip_rate
        self.transform = transform or eval_transform(image_size)
        self.decode_target = decode_target if decode_target is not None else image_size

    def __iter__(self):
        import webdataset as wds

        counter = SkipCounter(self.max_skip_rate)
        ds = wds.WebDataset(
            self.urls,
            shardshuffle=False,
            nodesplitter=wds.split_by_node,
            workersplitter=wds.split_by_worker,
            handler=_shard_error_handler(counter),
            empty_check=False,
        )
        for sample in ds:
            try:
                label, index = _label(sample), int(sample["__key__"].lstrip("s"))
                img = self.transform(decode_image(_image_bytes(sample), self.decode_target))
            except Exception as e:  # noqa: BLE001
                counter.skip(_where(sample), f"{type(e).__name__}: {e}")
                continue
            counter.ok()
            yield img, label, index


def restore_order(*arrays: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, ...]:
    """Sort gathered per-sample arrays by sample index (the split's order)."""
    order = np.argsort(index, kind="stable")
    return tuple(a[order] for a in arrays)
