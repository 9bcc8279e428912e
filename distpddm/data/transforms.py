"""Image transforms of the readers: encoded bytes in, ``uint8`` (3, S, S) tensors out; normalisation per batch.

Randomness comes from the ``rng`` a reader passes per batch (a ``random.Random`` seeded by seed, rank, worker,
epoch and batch), so augmentations differ between readers and replay exactly on resume.
"""

from __future__ import annotations

import io
import math
import random

import torch

from .images import decode_image, decode_tensor, pil_to_tensor, upright_size

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def crop_box(width: int, height: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), rng=random) -> tuple[int, ...]:
    """``(top, left, h, w)`` of a RandomResizedCrop: torchvision's ``get_params`` algorithm (ten tries of a
    uniform area fraction x log-uniform aspect, then a central crop clamped to ``ratio``) drawn from a
    ``random.Random`` -- a dozen tiny torch ops per image cost more than the draw.
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

    def __call__(self, data: bytes, rng: random.Random = random) -> torch.Tensor:
        from PIL import Image, ImageOps
        from torchvision.transforms.v2 import functional as F

        img = Image.open(io.BytesIO(data))  # reads the header only
        width, height = upright_size(img)
        top, left, h, w = crop_box(width, height, self.scale, self.ratio, rng)
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
                top, left, h, w = crop_box(x.shape[2], x.shape[1], self.scale, self.ratio, rng)
        x = F.resized_crop(x, top, left, h, w, [self.size, self.size], antialias=True)
        if self.hflip and rng.random() < 0.5:
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
