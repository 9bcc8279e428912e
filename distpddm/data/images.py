"""Decoding encoded images: upright (EXIF orientation applied), RGB, and no larger than needed."""

from __future__ import annotations

import io

import numpy as np

EXIF_ORIENTATION = 0x0112
#: Image file extensions the builder lists (any case) and the readers find in a shard's sample.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def decode_image(data: bytes, target: int | None = None):
    """PIL RGB image, upright (its EXIF orientation applied, as TorchCodec does); JPEGs much larger than
    ``target`` are decoded at a reduced scale (1/2 .. 1/8)."""
    from PIL import Image, ImageOps

    img = Image.open(io.BytesIO(data))
    if target is not None and img.format == "JPEG":
        img.draft("RGB", (target, target))  # keeps both sides >= target
    img = ImageOps.exif_transpose(img)
    img = img.convert("RGB")
    img.load()
    return img


def upright_size(img) -> tuple[int, int]:
    """(width, height) of an opened (not decoded) image as displayed: EXIF orientations 5-8 swap the sides."""
    width, height = img.size
    try:
        orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 -- a broken EXIF block orients nothing
        orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def decode_tensor(data: bytes):
    """``uint8`` (3, H, W) with channels-last memory (what libjpeg-turbo writes, and what the antialiased
    uint8 resize is fastest on). TorchCodec's decoders (JPEG, PNG, WebP, GIF; torchvision's successors)
    first; PIL for what they refuse (BMP, TIFF) and for a clearer error on a broken file."""
    from torchcodec.decoders import decode_image as codec_decode

    try:
        return codec_decode(data, mode="RGB")
    except (RuntimeError, ValueError):
        return pil_to_tensor(decode_image(data))


def pil_to_tensor(img):
    """``uint8`` (3, H, W) torch tensor of an RGB PIL image."""
    import torch  # here, not at import: the shard builder uses this module without torch

    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
