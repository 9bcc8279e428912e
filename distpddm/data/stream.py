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
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .images import decode_image, decode_tensor, pil_to_tensor, upright_size
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


def crop_box(width: int, height: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), rng=random) -> tuple[int, ...]:
    """``(top, left, h, w)`` of a RandomResizedCrop: torchvision's ``get_params`` algorithm (ten tries of a
    uniform area fraction x log-uniform aspect, then a central crop clamped to ``ratio``) drawn with Python's
    ``random``, which DataLoader seeds per worker -- a dozen tiny torch ops per image cost more than the draw.
    """
    area, log_lo, log_hi = width * height, math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    if width / height < min(ratio):
        w, h = width, round(width / min(ratio))
    elif width / height > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainCrop:
    """Encoded image -> RandomResizedCrop + horizontal flip, a ``uint8`` (3, S, S) tensor.

    The crop box is drawn from the header's size alone (:func:`crop_box`), before decoding: when the box is at
    least twice the output size a JPEG is decoded at 1/2 .. 1/8 scale (libjpeg DCT scaling) -- the box still
    covers >= S pixels, so nothing the output could show is lost. Resizing works on uint8 channels-last
    tensors (antialiased bilinear); :func:`normalize_batch` converts a whole batch at once, on the device.
    """

    def __init__(self, size: int, crop_scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: bool = True):
        self.size, self.scale, self.ratio, self.hflip = size, tuple(crop_scale), tuple(ratio), hflip

    def __call__(self, data: bytes) -> torch.Tensor:
        from PIL import Image, ImageOps
        from torchvision.transforms.v2 import functional as F

        img = Image.open(io.BytesIO(data))  # reads the header only
        width, height = upright_size(img)
        top, left, h, w = crop_box(width, height, self.scale, self.ratio)
        factor = 1
        if img.format == "JPEG":
            while factor < 8 and min(h, w) >= 2 * factor * self.size:
                factor *= 2
        if factor > 1:
            stored_w, stored_h = img.size
            img.draft("RGB", (-(-stored_w // factor), -(-stored_h // factor)))  # the largest scale keeping these
            x = pil_to_tensor(ImageOps.exif_transpose(img).convert("RGB"))
            sx, sy = x.shape[2] / width, x.shape[1] / height
            bottom, right = min(x.shape[1], round((top + h) * sy)), min(x.shape[2], round((left + w) * sx))
            top, left = min(round(top * sy), bottom - 1), min(round(left * sx), right - 1)
            h, w = bottom - top, right - left
        else:
            x = decode_tensor(data)
            if tuple(x.shape[1:]) != (height, width):  # a decoder that oriented otherwise than the EXIF said
                top, left, h, w = crop_box(x.shape[2], x.shape[1], self.scale, self.ratio)
        x = F.resized_crop(x, top, left, h, w, [self.size, self.size], antialias=True)
        if self.hflip and random.random() < 0.5:
            x = F.horizontal_flip(x)
        return x


def normalize_batch(
    x: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype=torch.float32, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``uint8`` (N, 3, H, W) -> ``(x / 255 - mean) / std`` in ``dtype``, on ``x``'s device. ``out``: a
    float buffer to reuse (on the CPU a fresh 38 MB batch costs more in page faults than the arithmetic)."""
    std_t = torch.tensor(std, device=x.device)
    scale = (1.0 / (255.0 * std_t))[:, None, None]
    shift = (torch.tensor(mean, device=x.device) / std_t)[:, None, None]
    if out is None or out.shape != x.shape or out.dtype != torch.float32 or out.device != x.device:
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    return out.copy_(x).mul_(scale).sub_(shift).to(dtype)


def train_transform(size: int, crop_scale=(0.08, 1.0), hflip: bool = True) -> TrainCrop:
    return TrainCrop(size, crop_scale=crop_scale, hflip=hflip)


class EvalCrop:
    """Encoded image -> shorter side resized to ``size * resize_ratio``, centre crop ``size``: the usual
    evaluation view, as a ``uint8`` (3, S, S) tensor. JPEGs at least twice that are decoded at reduced scale."""

    def __init__(self, size: int, resize_ratio: float = 256 / 224):
        self.size, self.short = size, int(round(size * resize_ratio))

    def __call__(self, data: bytes) -> torch.Tensor:
        from PIL import Image
        from torchvision.transforms.v2 import functional as F

        img = Image.open(io.BytesIO(data))  # reads the header only
        if img.format == "JPEG" and min(img.size) >= 2 * self.short:
            x = pil_to_tensor(decode_image(data, self.short))
        else:
            x = decode_tensor(data)
        return F.center_crop(F.resize(x, self.short, antialias=True), [self.size, self.size])


def eval_transform(size: int, resize_ratio: float = 256 / 224) -> EvalCrop:
    return EvalCrop(size, resize_ratio)


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
    """Endless P x K training batches ``(images (P*K, 3, S, S) uint8, labels (P*K,))`` from shards.

    Images stay ``uint8`` until :func:`normalize_batch` on the training device: a quarter of the bytes to
    pass between processes and to copy to the GPU. Shards are resampled with a per-rank, per-worker seed
    (epochs via resampling), so every rank and worker streams differently without coordination. Use with
    ``DataLoader(ds, batch_size=None, num_workers=n)``. ``transform`` maps encoded bytes to an image tensor.
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
        transform: Callable[[bytes], torch.Tensor] | None = None,
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
                img = self.transform(_image_bytes(sample))
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
        return _stack(images), torch.tensor(labels, dtype=torch.long)


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    """Stacked straight into shared memory inside a DataLoader worker (as ``default_collate`` does), so the
    batch is not copied again to cross to the main process."""
    out = None
    if torch.utils.data.get_worker_info() is not None:
        out = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype).share_memory_()
    return torch.stack(images, out=out)


class EvalDataset(torch.utils.data.IterableDataset):
    """Every sample exactly once across ranks and workers: ``(image uint8 (3, S, S), label, index)``.

    Images are normalised by the consumer (:func:`normalize_batch`), as for training. Shards are split by
    node then by worker, never shuffled; ``index`` is the sample's position in the split (from its key), so
    gathered results can be put back in order (:func:`restore_order`).
    """

    def __init__(
        self,
        urls: list[str],
        image_size: int = 224,
        max_skip_rate: float = 0.01,
        transform: Callable[[bytes], torch.Tensor] | None = None,
    ):
        super().__init__()
        self.urls, self.max_skip_rate = list(urls), max_skip_rate
        self.transform = transform or eval_transform(image_size)

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
                img = self.transform(_image_bytes(sample))
            except Exception as e:  # noqa: BLE001
                counter.skip(_where(sample), f"{type(e).__name__}: {e}")
                continue
            counter.ok()
            yield img, label, index


def restore_order(*arrays: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, ...]:
    """Sort gathered per-sample arrays by sample index (the split's order)."""
    order = np.argsort(index, kind="stable")
    return tuple(a[order] for a in arrays)
