import io
import json
import logging
import random
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds

from distpddm.data.shards import BuildOptions, build
from distpddm.data.sources import read_source
from distpddm.data.stream import (
    BadDataError,
    EvalDataset,
    PKBatchDataset,
    SkipCounter,
    pk_batches,
    resolve_shards,
    restore_order,
)
from tests import fixtures


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    images = fixtures.glyph_images(12, 8, root / "cache")
    fixtures.make_folder(root / "src", images)
    build(read_source("folder", root / "src"), root / "out", BuildOptions(shard_bytes=12_000, progress=False))
    return root / "out" / "train"


def test_training_batches_are_p_classes_by_k_images(shards):
    ds = PKBatchDataset(resolve_shards(shards).urls, classes_per_batch=4, images_per_class=3, image_size=32)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    for n, (x, y) in enumerate(loader):
        assert x.shape == (12, 3, 32, 32) and x.dtype == torch.float32
        counts = Counter(y.tolist())
        assert len(counts) == 4 and set(counts.values()) == {3}
        assert y.tolist() == sorted(y.tolist(), key=lambda v: y.tolist().index(v))  # classes are contiguous
        if n == 20:
            break


def test_eval_reads_every_sample_exactly_once_over_2_ranks_and_2_workers(shards, monkeypatch):
    shard_set = resolve_shards(shards)
    assert len(shard_set.urls) >= 4
    seen_index, seen_label = [], []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        ds = EvalDataset(shard_set.urls, image_size=32)
        loader = torch.utils.data.DataLoader(ds, batch_size=7, num_workers=2)
        for _, y, idx in loader:
            seen_index += idx.tolist()
            seen_label += y.tolist()
    assert sorted(seen_index) == list(range(shard_set.samples))
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    (labels,) = restore_order(np.array(seen_label), index=np.array(seen_index))
    truth = [int(s["cls"]) for s in wds.WebDataset(shard_set.urls, shardshuffle=False, empty_check=False)]
    assert labels.tolist() == truth


def _raw(label, key="k"):
    return {"__key__": key, "__url__": "mem", "cls": str(label).encode(), "jpg": b"x"}


def test_ten_thousand_classes_stream_with_bounded_memory():
    P, K, buffer = 16, 4, 512
    rng = random.Random(0)
    chunks = [c for c in range(10_000) for _ in range(2)]  # two chunks of K per class, shuffled
    rng.shuffle(chunks)
    consumed = 0
    emitted = 0
    peak = 0

    def stream():
        nonlocal consumed
        for c in chunks:
            for k in range(K):
                consumed += 1
                yield _raw(c, f"{c}-{k}")

    batches = 0
    for batch in pk_batches(stream(), P, K, buffer, SkipCounter(), random.Random(1)):
        emitted += len(batch)
        peak = max(peak, consumed - emitted)
        labels = [int(s["cls"]) for s in batch]
        assert len(batch) == P * K and len(set(labels)) == P
        assert all(Counter(labels)[c] == K for c in set(labels))
        batches += 1
    assert peak <= buffer + P * K  # held samples never exceed the buffer (plus the batch being formed)
    assert batches >= 0.99 * len(chunks) * K / (P * K)  # almost nothing dropped


def test_bad_samples_are_skipped_named_and_counted(caplog):
    def stream():
        for n in range(300):
            if n == 5:
                yield {"__key__": "nolabel", "__url__": "shard-9.tar", "jpg": b"x"}
            yield _raw(n % 10, f"s{n}")

    counter = SkipCounter(max_skip_rate=0.05)
    with caplog.at_level(logging.WARNING, "distpddm.data"):
        batches = list(pk_batches(stream(), 2, 2, 64, counter, random.Random(0)))
    assert counter.skipped == 1 and counter.seen == 301 and batches
    assert "shard-9.tar:nolabel" in caplog.text


def test_too_many_bad_samples_abort_with_a_clear_message():
    def stream():
        for n in range(1000):
            yield _raw(n % 10) if n % 10 else {"__key__": f"bad{n}", "__url__": "u.tar", "jpg": b"x"}

    with pytest.raises(BadDataError, match=r"skipped .*max_skip_rate.*u\.tar:bad"):
        list(pk_batches(stream(), 2, 2, 64, SkipCounter(max_skip_rate=0.05, min_samples=100), random.Random(0)))


def test_corrupt_image_in_a_shard_is_replaced_within_its_class(tmp_path, caplog):
    images = fixtures.glyph_images(4, 4, tmp_path / "cache")
    path = tmp_path / "bad.tar"
    with open(path, "wb") as f:
        w = wds.TarWriter(f, encoder=False)
        n = 0
        for c in range(4):
            for img in images[c]:
                data = fixtures.jpeg_bytes(img)
                if n == 2:
                    data = data[:40]  # truncated
                meta = json.dumps({"class_name": str(c)}).encode()
                w.write({"__key__": f"s{n:010d}", "jpg": data, "cls": str(c).encode(), "json": meta})
                n += 1
        w.close()
    ds = PKBatchDataset([str(path)], 2, 2, image_size=16, max_skip_rate=0.5)
    with caplog.at_level(logging.WARNING, "distpddm.data"):
        batches = iter(ds)
        for _ in range(30):
            x, y = next(batches)
            assert sorted(Counter(y.tolist()).values()) == [2, 2]
    assert x.shape == (4, 3, 16, 16)
    assert "bad.tar:s0000000002" in caplog.text and "does not decode" in caplog.text


def test_eval_skips_a_corrupt_image_and_counts_it(tmp_path, caplog):
    images = fixtures.glyph_images(2, 3, tmp_path / "cache")
    path = tmp_path / "e.tar"
    with open(path, "wb") as f:
        w = wds.TarWriter(f, encoder=False)
        for n in range(6):
            data = fixtures.jpeg_bytes(images[n % 2][n // 2])
            w.write({"__key__": f"s{n:010d}", "jpg": data if n != 4 else b"garbage", "cls": str(n % 2).encode()})
        w.close()
    with caplog.at_level(logging.WARNING, "distpddm.data"):
        got = [idx for _, _, idx in EvalDataset([str(path)], image_size=16, max_skip_rate=0.5)]
    assert got == [0, 1, 2, 3, 5]
    assert "e.tar:s0000000004" in caplog.text


def test_reduced_size_jpeg_decoding():
    from distpddm.data.stream import decode_image

    img = np.zeros((800, 600), dtype=np.uint8)
    buf = io.BytesIO()
    from PIL import Image

    Image.fromarray(img).convert("RGB").save(buf, format="JPEG")
    small = decode_image(buf.getvalue(), target=100)
    assert min(small.size) >= 100 and small.size[0] <= 300  # decoded at 1/2 .. 1/8 scale, not full size
    assert decode_image(buf.getvalue()).size == (600, 800)
