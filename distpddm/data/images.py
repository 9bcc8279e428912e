"""Decoding encoded images: upright (EXIF orientation applied), RGB, and no larger than needed. Transparent
parts (RGBA clip art and logos, a palette's transparent index) are composited onto white: dropping the alpha
channel shows whatever colour lies under it, black in most files, so a drawing's background would say nothing
of the drawing."""

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
    img = to_rgb(ImageOps.exif_transpose(img))
    img.load()
    return img


def has_alpha(img) -> bool:
    """Whether an opened PIL image has transparent parts to composite (its header says so: no decoding)."""
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def eight_bit(img):
    """A 16-bit grayscale image (PIL's ``I;16``, or ``I``) as 8-bit ``L`` (``LA`` when its transparent value is
    set), scaled: PIL's own conversion to RGB clips at 255, and the image comes out white."""
    from PIL import Image

    if not (img.mode.startswith("I;16") or img.mode == "I"):
        return img
    arr = np.asarray(img).astype(np.int64)
    arr8 = arr >> 8 if img.mode.startswith("I;16") or arr.max() > 255 else arr  # "I": maybe 8-bit values
    gray = Image.fromarray(arr8.clip(0, 255).astype(np.uint8), "L")
    transparent = img.info.get("transparency")
    if isinstance(transparent, int):
        gray.putalpha(Image.fromarray(np.where(arr == transparent, 0, 255).astype(np.uint8), "L"))
    return gray


def to_rgb(img):
    """An RGB PIL image: 16-bit gray scaled to 8 bits, transparent parts composited onto white."""
    from PIL import Image

    img = eight_bit(img)
    if not has_alpha(img):
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


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
    from PIL import Image
    from torchcodec.decoders import decode_image as codec_decode

    alpha = False
    try:
        with Image.open(io.BytesIO(data)) as header:  # the header only
            alpha = has_alpha(header)
    except (OSError, ValueError, SyntaxError):  # not an image PIL knows: TorchCodec's verdict, then PIL's error
        pass
    if alpha:  # TorchCodec's RGB drops the alpha channel
        return pil_to_tensor(decode_image(data))
    try:
        return codec_decode(data, mode="RGB")
    except (RuntimeError, ValueError):
        return pil_to_tensor(decode_image(data))


def pil_to_tensor(img):
    """``uint8`` (3, H, W) torch tensor of an RGB PIL image."""
    import torch  # here, not at import: the shard builder uses this module without torch

    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
