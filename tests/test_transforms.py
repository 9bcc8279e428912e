"""Image transforms of the readers: crops, flips, reduced-scale decoding, EXIF orientation, normalisation."""

import io
import random

import numpy as np
import pytest
import torch


def _jpeg(width, height, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (height // 100 + 2, width // 100 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BILINEAR)  # smooth: a photograph-like JPEG
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), np.asarray(img)


def test_reduced_size_jpeg_decoding():
    from distpddm.data.images import decode_image

    data, _ = _jpeg(600, 800)
    small = decode_image(data, target=100)
    assert min(small.size) >= 100 and small.size[0] <= 300  # decoded at 1/2 .. 1/8 scale, not full size
    assert decode_image(data).size == (600, 800)


def test_crop_box_draws_torchvisions_distribution():
    from scipy.stats import ks_2samp
    from torchvision.transforms import RandomResizedCrop

    from distpddm.data.transforms import crop_box

    for width, height in ((500, 375), (120, 900)):  # the second often falls back to the clamped central crop
        torch.manual_seed(0)
        img = torch.empty(1).expand(3, height, width)
        ref = np.array([RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(3000)])
        rng = random.Random(0)
        ours = np.array([crop_box(width, height, rng=rng) for _ in range(3000)])
        assert (ours[:, 2] >= 1).all() and (ours[:, 0] + ours[:, 2] <= height).all()
        assert (ours[:, 3] >= 1).all() and (ours[:, 1] + ours[:, 3] <= width).all()
        for col in range(4):  # top, left, h, w: same distributions (a 1-in-1000 test per column)
            assert ks_2samp(ref[:, col], ours[:, col]).pvalue > 1e-3, (width, height, col)
    assert crop_box(100, 100, scale=(1.0, 1.0), ratio=(1.0, 1.0)) == (0, 0, 100, 100)


def test_train_crop_matches_a_full_decode_crop_and_resize():
    from torchvision.transforms.v2 import functional as F

    from distpddm.data.images import decode_tensor
    from distpddm.data.transforms import TrainCrop, crop_box

    data, _ = _jpeg(1600, 1200)
    crop = TrainCrop(64, crop_scale=(0.5, 1.0), hflip=False)
    full = decode_tensor(data)
    for seed in range(4):
        random.seed(seed)
        out = crop(data)  # a crop of >= 600 px into 64 px: decoded at reduced scale
        random.seed(seed)
        top, left, h, w = crop_box(1600, 1200, (0.5, 1.0))
        ref = F.resized_crop(full, top, left, h, w, [64, 64], antialias=True)
        assert out.shape == (3, 64, 64) and out.dtype == torch.uint8
        shifted = F.resized_crop(full, top + 12, left + 12, h, w, [64, 64], antialias=True)
        assert (out.float() - ref.float()).abs().mean() < 4  # same picture, up to DCT-scaling differences
        assert (out.float() - shifted.float()).abs().mean() > 8  # ... which a 12 px misplacement exceeds


def test_train_crop_decodes_at_reduced_scale_only_when_the_crop_allows(monkeypatch):
    from PIL import Image

    from distpddm.data import transforms

    data, _ = _jpeg(1600, 1200)
    decoded_sizes = []
    original = Image.Image.convert

    def spy(self, *a, **k):
        decoded_sizes.append(self.size)
        return original(self, *a, **k)

    monkeypatch.setattr(Image.Image, "convert", spy)
    transforms.TrainCrop(64, crop_scale=(0.5, 1.0))(data)  # crop >= 848 px for 64 px: 1/8 scale
    assert decoded_sizes[-1] == (200, 150)
    before = len(decoded_sizes)
    out = transforms.TrainCrop(1000, crop_scale=(0.5, 1.0))(data)  # crop < 2000 px: full decode by torchvision
    assert len(decoded_sizes) == before and out.shape == (3, 1000, 1000)


def test_train_crop_flips_half_the_time_and_reads_other_formats():
    from PIL import Image

    from distpddm.data.transforms import TrainCrop

    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[:, :16] = 255  # left half white
    outs = {}
    for fmt in ("PNG", "BMP"):  # BMP: TorchCodec refuses it, PIL reads it
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        crop = TrainCrop(32, crop_scale=(1.0, 1.0), ratio=(1.0, 1.0))
        random.seed(0)
        outs[fmt] = [crop(buf.getvalue()) for _ in range(200)]
    flipped = [bool(o[0, 0, 0] == 0) for o in outs["PNG"]]  # left edge black: flipped
    assert 70 < sum(flipped) < 130
    assert all(torch.equal(a, b) for a, b in zip(outs["PNG"], outs["BMP"], strict=True))


def test_normalize_batch_matches_torchvision_and_reuses_its_buffer():
    from torchvision.transforms.v2 import functional as F

    from distpddm.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_batch

    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    ref = F.normalize(x.float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    out = normalize_batch(x)
    assert torch.allclose(out, ref, atol=1e-5)
    again = normalize_batch(x.flip(0), out=out)
    assert again.data_ptr() == out.data_ptr() and torch.allclose(again, ref.flip(0), atol=1e-5)
    assert normalize_batch(x, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_eval_crop_is_the_usual_resize_and_centre_crop():
    from PIL import Image
    from torchvision.transforms import v2

    from distpddm.data.transforms import EvalCrop

    recipe = v2.Compose([v2.ToImage(), v2.Resize(73, antialias=True), v2.CenterCrop(64)])  # 64 * 256 / 224
    for width, height in ((120, 90), (1600, 1200)):  # the second is decoded at reduced scale
        data, _ = _jpeg(width, height)
        out = EvalCrop(64)(data)
        ref = recipe(Image.open(io.BytesIO(data)).convert("RGB"))
        assert out.shape == (3, 64, 64) and out.dtype == torch.uint8
        assert (out.float() - ref.float()).abs().mean() < 3, (width, height)


def _rotated_jpeg(width, height):
    """A JPEG stored ``width`` x ``height`` whose EXIF says: shown turned 90 degrees (orientation 6)."""
    from PIL import Image

    arr = np.zeros((height, width, 3), dtype=np.uint8)
    arr[:, : width // 2] = 255  # stored: left half white
    arr[: height // 4, :, 0] = 200  # and a red-ish top band, so every rotation looks different
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def _upright_reference(data, size):
    from PIL import Image, ImageOps
    from torchvision.transforms.v2 import functional as F

    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    return F.resize(x, [size, size], antialias=True)


@pytest.mark.parametrize("stored", [(160, 80), (1600, 800)])  # full decode by TorchCodec; 1/4-scale decode by PIL
def test_train_crop_shows_exif_rotated_jpegs_upright(stored):
    from distpddm.data.transforms import TrainCrop

    data = _rotated_jpeg(*stored)
    shown_ratio = stored[1] / stored[0]  # width / height as displayed
    crop = TrainCrop(32, crop_scale=(1.0, 1.0), ratio=(shown_ratio, shown_ratio), hflip=False)
    out = crop(data)  # the whole picture, squeezed to 32 x 32
    ref = _upright_reference(data, 32)
    assert (out.float() - ref.float()).abs().mean() < 6
    from PIL import Image

    stored_img = Image.open(io.BytesIO(data)).convert("RGB").resize((32, 32), Image.BILINEAR)  # EXIF ignored
    stored_view = torch.from_numpy(np.array(stored_img)).permute(2, 0, 1)
    assert (out.float() - stored_view.float()).abs().mean() > 60  # ... which is far from upright


def test_eval_crop_and_resized_shards_show_exif_rotated_jpegs_upright():
    from PIL import Image

    from distpddm.data.shards import encode_image
    from distpddm.data.transforms import EvalCrop

    data = _rotated_jpeg(1600, 800)
    out = EvalCrop(64)(data)
    top = out[:, :8].float().mean(dim=(1, 2))  # upright: the white half is on top
    bottom = out[:, -8:].float().mean(dim=(1, 2))
    assert top.mean() > 200 and bottom.mean() < 100

    kept, _, w, h = encode_image(data, "jpg", None, 90)
    assert kept == data and (w, h) == (800, 1600)  # bytes kept (with their EXIF), size as displayed
    small, ext, w, h = encode_image(data, "jpg", 320, 90)
    img = Image.open(io.BytesIO(small))
    assert ext == "jpg" and (w, h) == img.size == (160, 320)
    assert 0x0112 not in img.getexif()  # upright pixels, no orientation left to apply
    ref = _upright_reference(data, 64).float()
    got = torch.from_numpy(np.array(img.convert("RGB").resize((64, 64), Image.BILINEAR))).permute(2, 0, 1).float()
    assert (got - ref).abs().mean() < 8


def _transparent(mode: str, fmt: str) -> bytes:
    """8 x 8: the left half opaque red (gray 76 in L), the right half fully transparent over black, one pixel
    half transparent blue."""
    from PIL import Image

    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    for y in range(8):
        for x in range(4):
            rgba.putpixel((x, y), (255, 0, 0, 255))
    rgba.putpixel((6, 6), (0, 0, 255, 128))
    img = {"RGBA": rgba, "LA": rgba.convert("LA")}.get(mode)
    if mode == "P":  # a palette with a transparent index (GIF's and many PNGs' way)
        img = rgba.convert("RGB").quantize(4)
        img.info["transparency"] = img.getpixel((7, 0))
    buf = io.BytesIO()
    img.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}),
             **({"transparency": img.info["transparency"]} if mode == "P" else {}))  # fmt: skip
    return buf.getvalue()


@pytest.mark.parametrize(("mode", "fmt"), [("RGBA", "PNG"), ("RGBA", "WEBP"), ("LA", "PNG"), ("P", "PNG"),
                                           ("P", "GIF")])  # fmt: skip
def test_transparent_parts_are_composited_onto_white_by_every_reader(mode, fmt):
    """Clip art is RGBA: dropping the alpha channel shows the black under it. Every decoding path -- TorchCodec's
    (training and evaluation crops), PIL's, and the builder's re-encoding -- shows white there instead."""
    from distpddm.data.images import decode_image, decode_tensor, pil_to_tensor
    from distpddm.data.shards import encode_image
    from distpddm.data.transforms import EvalCrop, TrainCrop

    data = _transparent(mode, fmt)
    stored, _, _, _ = encode_image(data, fmt.lower(), max_side=8, quality=100)
    views = {
        "decode_tensor": decode_tensor(data),
        "decode_image": pil_to_tensor(decode_image(data)),
        "eval_crop": EvalCrop(8, resize_ratio=1.0)(data),
        "train_crop": TrainCrop(8, crop_scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False)(data),
        "rebuilt": decode_tensor(stored),
    }
    for name, x in views.items():
        right = x[:, :, 5:].int()
        assert right[:, :5].min() >= 245, (name, right[:, :5].min())  # white (JPEG re-encoding: near white)
        assert x[:, :, :3].int().sum(0).max() < 3 * 245, name  # the opaque half is not white
        if mode == "RGBA" and name != "rebuilt":
            assert abs(int(x[2, 6, 6]) - 255) <= 2 and abs(int(x[0, 6, 6]) - 127) <= 3, name  # half blue on white


@pytest.mark.parametrize("transparent", [None, 0])
def test_sixteen_bit_gray_pngs_keep_their_tones(transparent):
    """PIL converts 16-bit gray to RGB by clipping at 255 (a white image); TorchCodec scales. Every path scales,
    and a 16-bit transparent value is composited onto white like an alpha channel."""
    from PIL import Image

    from distpddm.data.images import decode_image, decode_tensor, pil_to_tensor
    from distpddm.data.shards import encode_image

    arr = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520: mean 127.5 in 8 bits
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG", **({} if transparent is None else {"transparency": transparent}))
    data = buf.getvalue()
    stored, _, _, _ = encode_image(data, "png", max_side=64, quality=100)
    for name, x in {"decode_tensor": decode_tensor(data), "decode_image": pil_to_tensor(decode_image(data)),
                    "rebuilt": decode_tensor(stored)}.items():  # fmt: skip
        x = x.float()
        if transparent is None:
            assert abs(float(x.mean()) - 127.5) < 2, (name, float(x.mean()))
        else:
            assert float(x[:, 0, 0].min()) >= 250 and abs(float(x[0, 40, 0]) - (40 * 64 * 16 >> 8)) < 3, name
