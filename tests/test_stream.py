"""The shard readers: P x K training streams (never stalling, reproducible, rank-disjoint, resumable) and
exactly-once evaluation, on shards the builder made from real glyph images."""

import errno
import json
import logging
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from distpddm.data import retry, stream
from distpddm.data.epochs import reader_ranges
from distpddm.data.evalset import EvalDataset
from distpddm.data.shards import BuildOptions, build, verify
from distpddm.data.sources import read_source
from distpddm.data.stream import (
    BadDataError,
    CannotBatchError,
    PKBatchDataset,
    SkipCounter,
    StorageUnavailable,
    StreamState,
    resolve_shards,
)
from tests import fixtures


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    images = fixtures.glyph_images(12, 8, root / "cache")
    fixtures.make_folder(root / "src", images)
    build(read_source("folder", root / "src"), root / "out", BuildOptions(shard_bytes=12_000, progress=False))
    return root / "out" / "train"


@pytest.fixture(scope="module")
def longtail(tmp_path_factory):
    """40 fonts' glyphs with long-tailed class sizes, 4 .. 60 images (as real data sets are), ~20 shards."""
    root = tmp_path_factory.mktemp("longtail")
    sizes = [int(4 * 15 ** (c / 39)) for c in range(40)]
    images = fixtures.glyph_images(40, 62, root / "cache")
    fixtures.make_folder(root / "src", [imgs[:n] for imgs, n in zip(images, sizes, strict=True)])
    build(read_source("folder", root / "src"), root / "out", BuildOptions(shard_bytes=40_000, progress=False))
    return root / "out" / "train"


def _loader(ds, workers=2):
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)


def _as_rank(monkeypatch, rank, world):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))


def _take(ds, n, workers=2):
    out = []
    for batch in _loader(ds, workers):
        out.append(batch)
        if len(out) == n:
            return out
    raise AssertionError("the stream ended")


def _same(a, b):
    return (
        torch.equal(a.images, b.images)
        and torch.equal(a.labels, b.labels)
        and torch.equal(a.keys, b.keys)
        and a.info == b.info
    )


def _epoch_reader(ds, epoch, reader, readers):
    return stream._EpochReader(ds, epoch, reader, readers, reader % 2, SkipCounter())


def test_training_batches_are_p_classes_by_k_images(shards):
    ds = PKBatchDataset(shards, classes_per_batch=4, images_per_class=3, image_size=32)
    for x, y, keys, info in _take(ds, 20):
        assert x.shape == (12, 3, 32, 32) and x.dtype == torch.uint8  # normalised on the device
        counts = Counter(y.tolist())
        assert len(counts) == 4 and set(counts.values()) == {3}
        assert y.tolist() == sorted(y.tolist(), key=y.tolist().index)  # classes are contiguous
        assert len(set(keys.tolist())) == 12 and info.worker in (0, 1)


def test_long_tailed_shards_stream_without_stalling(longtail):
    # The stall: long-tailed classes, P x K = 8 x 4, many epochs through 2 loader workers.
    index = resolve_shards(longtail)
    assert min(index.class_counts) == 4 and max(index.class_counts) == 60
    ds = PKBatchDataset(longtail, classes_per_batch=8, images_per_class=4, image_size=16)
    batches = _take(ds, 60)
    seen: dict[tuple[int, int], set] = {}
    for batch in batches:
        assert len(set(batch.labels.tolist())) == 8 and set(Counter(batch.labels.tolist()).values()) == {4}
        keys = seen.setdefault((batch.info.worker, batch.info.epoch), set())
        assert not keys & set(batch.keys.tolist())  # no sample twice within a reader's epoch
        keys |= set(batch.keys.tolist())
    assert max(b.info.epoch for b in batches) >= 2  # it went on, epoch after epoch
    used = Counter(index.class_counts[c] for b in batches for c in b.labels.tolist())
    assert used[60] > used[4]  # proportional: large classes are drawn more often


def test_two_ranks_by_two_workers_read_every_sample_once_per_epoch(longtail, monkeypatch):
    ds = PKBatchDataset(longtail, classes_per_batch=4, images_per_class=4, image_size=16)
    total = resolve_shards(longtail).samples
    read_keys: list[str] = []
    original = stream.read_range

    def spy(f, index, lo, hi):
        for n, sample in original(f, index, lo, hi):
            read_keys.append(sample["__key__"])
            yield n, sample

    monkeypatch.setattr(stream, "read_range", spy)
    for epoch in (0, 1):
        read_keys.clear()
        batch_keys: list[int] = []
        for reader in range(4):  # rank 0 and 1, loader workers 0 and 1 each
            for batch in _epoch_reader(ds, epoch, reader, 4).run(skip=0):
                batch_keys += batch.keys.tolist()
        assert sorted(int(k[1:]) for k in read_keys) == list(range(total))  # every sample once, none missing
        assert len(batch_keys) == len(set(batch_keys)) > 0.6 * total  # in batches: none twice, most used


def test_each_reader_loads_only_its_own_shard_indexes(longtail, monkeypatch):
    # Start-up at 64 ranks: a reader touches its own shards' indexes, never every shard's.
    ds = PKBatchDataset(longtail, classes_per_batch=4, images_per_class=4, image_size=16)
    loaded = []
    original = stream.load_shard_index
    monkeypatch.setattr(stream, "load_shard_index", lambda url: loaded.append(url) or original(url))
    list(_epoch_reader(ds, 0, reader=1, readers=4).run(skip=0))
    own = reader_ranges(ds.counts, ds.seed, 0, 1, 4)
    assert sorted(loaded) == sorted(stream.idx_name(ds.urls[s]) for s, _, _ in own)
    assert len(loaded) < len(ds.urls) / 2


def test_the_same_seed_gives_the_same_batches_on_every_rank(longtail, monkeypatch):
    first = {}
    for rank in (0, 1):
        _as_rank(monkeypatch, rank, 2)
        a = _take(PKBatchDataset(longtail, 4, 4, image_size=16, seed=3), 8)
        b = _take(PKBatchDataset(longtail, 4, 4, image_size=16, seed=3), 8)
        assert all(_same(x, y) for x, y in zip(a, b, strict=True))
        first[rank] = {k for batch in a if batch.info.epoch == 0 for k in batch.keys.tolist()}
    assert not first[0] & first[1]  # ranks read disjoint samples within the epoch
    other = _take(PKBatchDataset(longtail, 4, 4, image_size=16, seed=4), 8)
    assert not all(_same(x, y) for x, y in zip(a, other, strict=True))


def test_augmentations_differ_between_ranks_and_workers(tmp_path, monkeypatch):
    # Every sample is the same picture: batches can differ only through their crops and flips.
    images = fixtures.glyph_images(1, 1, tmp_path / "cache")
    picture = fixtures.jpeg_bytes(np.kron(images[0][0], np.ones((4, 4), np.uint8)))  # 128 px
    fixtures.write_shards(tmp_path / "same", [(n // 8, picture) for n in range(8 * 16)], per_shard=16)
    views = {}
    for rank in (0, 1):
        _as_rank(monkeypatch, rank, 2)
        for batch in _take(PKBatchDataset(tmp_path / "same", 4, 4, image_size=32, seed=0), 2):
            views[(rank, batch.info.worker)] = batch.images
    assert len(views) == 4
    assert all(not torch.equal(views[a], views[b]) for a in views for b in views if a < b)
    again = _take(PKBatchDataset(tmp_path / "same", 4, 4, image_size=32, seed=0), 1)[0]
    assert torch.equal(again.images, views[(1, 0)])  # and each reader's own draws replay exactly


@pytest.mark.parametrize("stop", [5, 8])
def test_a_resumed_stream_continues_the_uninterrupted_one(longtail, monkeypatch, stop):
    _as_rank(monkeypatch, 1, 2)
    ds = PKBatchDataset(longtail, 8, 4, image_size=16, seed=1, buffer_images=64)
    whole = _take(ds, 16)
    assert len({b.info.epoch for b in whole}) >= 2  # the stop and the rest cross an epoch boundary
    state = ds.start_state(world=2, workers=2)
    for batch in whole[:stop]:
        state.advance(batch.info)  # what the trainer does with every batch it consumes
    saved = StreamState.from_json(state.to_json())  # as a checkpoint stores it
    resumed = _take(PKBatchDataset(longtail, 8, 4, image_size=16, seed=1, buffer_images=64, start=saved), 16 - stop)
    assert all(_same(x, y) for x, y in zip(whole[stop:], resumed, strict=True))


def test_a_resume_with_another_worker_count_starts_the_next_epoch(longtail, monkeypatch, caplog):
    _as_rank(monkeypatch, 0, 1)
    ds = PKBatchDataset(longtail, 4, 4, image_size=16)
    state = ds.start_state(world=1, workers=2)
    for batch in _take(ds, 9):
        state.advance(batch.info)
    with caplog.at_level(logging.WARNING, "distpddm.data"):
        again = PKBatchDataset(longtail, 4, 4, image_size=16, start=state)
        resumed = _take(again, 1, workers=0)[0]
    assert (resumed.info.epoch, resumed.info.index) == (state.epoch + 1, 0)
    # ... and the position the trainer goes on saving says so for every worker, before any batch is taken
    assert again.start_state(world=1, workers=1, warn=False).positions == {0: (state.epoch + 1, 0)}
    # With another world size every rank starts the same epoch: the one after the furthest any rank reached
    # (a rank the saved run did not have gets only that figure).
    state.epoch_all = state.epoch + 3
    for start in (state, StreamState(layout={}, epoch_all=state.epoch + 3)):
        grown = PKBatchDataset(longtail, 4, 4, image_size=16, start=start).start_state(world=3, workers=2, warn=False)
        assert grown.positions == {0: (state.epoch + 4, 0), 1: (state.epoch + 4, 0)}
    assert "workers" in caplog.text and f"start of epoch {state.epoch + 1}" in caplog.text
    # A position saved before the batcher drew its groups, or before the readers' cut moved each epoch (no
    # "batcher" or "ranges" in its layout), would replay other batches: it too restarts at the next epoch, saying why.
    for key in ("batcher", "ranges"):
        caplog.clear()
        old = StreamState.from_json(state.to_json())
        del old.layout[key]
        old.layout["workers"] = 1
        with caplog.at_level(logging.WARNING, "distpddm.data"):
            before = PKBatchDataset(longtail, 4, 4, image_size=16, start=old).start_state(world=1, workers=1)
        assert before.positions == {0: (max(state.epoch, state.epoch_all) + 1, 0)} and f"other {key}" in caplog.text


def test_a_share_too_small_for_a_batch_is_a_clear_error(shards, monkeypatch):
    _as_rank(monkeypatch, 3, 8)  # 96 images over 8 ranks: 12 per reader, P x K = 16
    with pytest.raises(CannotBatchError, match=r"formed no batch in epoch 0.*12 samples.*needs 4 such classes"):
        next(iter(PKBatchDataset(shards, 4, 4, image_size=16)))


def test_training_needs_the_split_index(shards):
    with pytest.raises(ValueError, match="shards build"):
        PKBatchDataset(str(shards / "shard-{000000..000001}.tar"), 4, 4)


def test_corrupt_image_in_a_shard_is_replaced_within_its_class(tmp_path, caplog):
    images = fixtures.glyph_images(4, 4, tmp_path / "cache")
    samples = [(c, fixtures.jpeg_bytes(img)) for c in range(4) for img in images[c]]
    samples[2] = (0, samples[2][1][:40])  # truncated
    fixtures.write_shards(tmp_path / "bad", samples, per_shard=16)
    ds = PKBatchDataset(tmp_path / "bad", 2, 2, image_size=16, max_skip_rate=0.5)
    with caplog.at_level(logging.WARNING, "distpddm.data"):
        for x, y, keys, _ in _take(ds, 30, workers=0):
            assert sorted(Counter(y.tolist()).values()) == [2, 2] and x.shape == (4, 3, 16, 16)
            if (keys == -1).any():
                replaced = keys.tolist().index(-1)
                assert y[replaced] == 0 and 2 not in keys.tolist()
    assert "bad/shard-000000.tar:s0000000002" in caplog.text and "does not decode" in caplog.text


def test_too_many_bad_images_stop_the_run_naming_them(tmp_path):
    images = fixtures.glyph_images(4, 8, tmp_path / "cache")
    samples = [
        (c, fixtures.jpeg_bytes(img) if k % 2 else b"garbage") for c in range(4) for k, img in enumerate(images[c])
    ]
    fixtures.write_shards(tmp_path / "bad", samples * 10, per_shard=40)
    with pytest.raises(BadDataError, match=r"max_skip_rate=1\.00%.*bad/shard-0000\d\d\.tar:s\d+ \(image does not"):
        _take(PKBatchDataset(tmp_path / "bad", 2, 2, image_size=16), 200, workers=0)


def test_a_missing_shard_is_skipped_and_counted(longtail, tmp_path, caplog):
    import shutil

    split = tmp_path / "split"
    shutil.copytree(longtail, split)
    victim = resolve_shards(split).urls[3]
    (split / victim.rsplit("/", 1)[1]).unlink()
    lenient = PKBatchDataset(split, 4, 4, image_size=16, max_skip_rate=0.5)
    with caplog.at_level(logging.WARNING, "distpddm.data"):
        for batch in _loader(lenient, workers=0):  # a whole epoch, and into the next
            if batch.info.epoch == 1:
                break
    warned = [r.getMessage() for r in caplog.records if "shard-000003.tar" in r.getMessage()]
    assert warned and all("shard unreadable (FileNotFoundError" in m for m in warned)
    assert len(warned) <= 2  # once per time the shard comes round, not once per sample
    with pytest.raises(BadDataError, match="shard-000003.tar"):
        _take(PKBatchDataset(split, 4, 4, image_size=16), 100, workers=0)


def test_real_world_images_build_verify_and_stream(tmp_path):
    """Long-tailed classes of RGBA, grayscale, CMYK, palette, 16-bit, 1-bit, odd-sized and tiny images in
    every format the builder lists, kept as they are and re-encoded: every image reaches a batch as uint8 RGB."""
    from PIL import Image

    images = fixtures.glyph_images(10, 40, tmp_path / "cache")
    kinds = [("RGB", "jpg"), ("L", "jpg"), ("CMYK", "jpg"), ("RGBA", "png"), ("P", "png"), ("LA", "png"),
             ("I;16", "png"), ("1", "png"), ("RGB", "webp"), ("RGB", "bmp"), ("RGB", "tif"), ("P", "gif")]  # fmt: skip
    sizes = [3, 4, 5, 6, 8, 11, 15, 20, 28, 40]  # long-tailed: 3 .. 40 images per class
    for c, n in enumerate(sizes):
        for k in range(n):
            mode, ext = kinds[(c + k) % len(kinds)]
            glyph = Image.fromarray(images[c][k]).convert("RGB")
            glyph = glyph.resize([(48, 40), (7, 90), (300, 13), (2, 2)][k % 4])  # odd sizes, down to 2 px
            if mode == "I;16":
                img = Image.fromarray(np.asarray(glyph.convert("L")).astype(np.uint16) * 257)
            else:
                img = glyph.convert(mode)
            path = tmp_path / "src" / f"font{c:02d}" / f"{k:03d}.{ext.upper() if k % 3 == 0 else ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path)
    total = sum(sizes)
    for max_side in (None, 24):
        out = tmp_path / f"out-{max_side}"
        index = build(
            read_source("folder", tmp_path / "src"),
            out,
            BuildOptions(shard_bytes=20_000, max_side=max_side, progress=False),
        )
        assert index["train"]["samples"] == total and index["train"]["class_counts"] == sizes
        assert all(r.ok for r in verify(out, progress=False))
        keys = set()
        for batch in _take(PKBatchDataset(out / "train", 4, 3, image_size=16), 12, workers=0):
            assert batch.images.shape == (12, 3, 16, 16) and batch.images.dtype == torch.uint8
            assert (batch.keys >= 0).all()  # nothing was replaced: every image decoded
            keys |= set(batch.keys.tolist())
        assert len(keys) > total // 2
        got = [idx for x, _, idx, _ in EvalDataset(out / "train", image_size=16) if x.shape == (3, 16, 16)]
        assert sorted(got) == list(range(total))


# ------------------------------------------------------------------------------------- transient read errors


class _Flaky:
    """A shard file whose reads fail with ``OSError`` from byte ``bad_from`` on (while ``failing()`` says so)."""

    def __init__(self, f, bad_from, failing):
        self.f, self.bad_from, self.failing = f, bad_from, failing

    def seek(self, pos, whence=0):
        return self.f.seek(pos, whence)

    def read(self, size=-1):
        if self.f.tell() + max(size, 1) > self.bad_from and self.failing():
            raise OSError(5, "Input/output error (a flaky mount)")
        return self.f.read(size)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def sleeps(monkeypatch):
    """The backoff's waits, recorded instead of slept."""
    waits = []
    monkeypatch.setattr(retry, "_sleep", waits.append)
    return waits


def _undisturbed(shards, monkeypatch, n=12):
    _as_rank(monkeypatch, 0, 1)
    return _take(PKBatchDataset(shards, 4, 3, image_size=16, seed=2), n, workers=0)


@pytest.mark.parametrize("where", ["open", "index", "read"])
def test_a_read_error_that_passes_is_retried_and_changes_no_batch(shards, monkeypatch, sleeps, caplog, where):
    whole = _undisturbed(shards, monkeypatch)
    urls = resolve_shards(shards).urls
    failed = Counter()  # url -> failures so far: every shard fails once, at its open, index or mid-read
    open_, load = stream._open, stream.load_shard_index

    def once(url):
        failed[url.replace(".idx.npz", ".tar")] += 1
        return failed[url.replace(".idx.npz", ".tar")] == 1

    def flaky_open(url, spans=None):
        if where == "open" and once(url):
            raise OSError(5, "Input/output error (NFS hiccup)")
        f = open_(url, spans)
        if where == "read":
            offsets = stream.load_shard_index(stream.idx_name(url)).offsets
            return _Flaky(f, int(offsets[len(offsets) // 2]), lambda: once(url))  # part-way through the shard
        return f

    def flaky_index(url):
        if where == "index" and once(url):
            raise OSError(503, "Service Unavailable (S3 SlowDown)")
        return load(url)

    monkeypatch.setattr(stream, "_open", flaky_open)
    monkeypatch.setattr(stream, "load_shard_index", flaky_index)
    with caplog.at_level(logging.WARNING, "distpddm.data"):
        again = _take(PKBatchDataset(shards, 4, 3, image_size=16, seed=2), 12, workers=0)
    assert set(failed) >= set(urls) and all(n >= 2 for n in failed.values())  # each failed once, then read
    assert all(_same(x, y) for x, y in zip(whole, again, strict=True))  # the same samples, batches, crops
    assert sleeps and set(sleeps) == {retry.RETRY_BASE_S}  # one retry each, after the first wait
    retries = [r.getMessage() for r in caplog.records if f"retry 1 of {retry.READ_RETRIES}" in r.getMessage()]
    assert len(retries) == len(sleeps) and all("shard-0000" in m and "OSError" in m for m in retries)
    assert "skipping" not in caplog.text


def test_a_resumed_stream_retries_the_samples_it_fetches_again(shards, monkeypatch, sleeps):
    whole = _undisturbed(shards, monkeypatch, n=10)
    ds = PKBatchDataset(shards, 4, 3, image_size=16, seed=2)
    state = ds.start_state(world=1, workers=1)
    for batch in whole[:5]:
        state.advance(batch.info)
    failed, open_ = Counter(), stream._open

    def flaky_open(url, spans=None):
        failed[url] += 1
        if failed[url] == 1:
            raise OSError(110, "Connection timed out")
        return open_(url, spans)

    monkeypatch.setattr(stream, "_open", flaky_open)
    resumed = _take(PKBatchDataset(shards, 4, 3, image_size=16, seed=2, start=state), 5, workers=0)
    assert all(_same(x, y) for x, y in zip(whole[5:], resumed, strict=True)) and sleeps


def test_a_shard_that_stays_unreadable_is_skipped_and_named_after_the_retries(shards, monkeypatch, sleeps, caplog):
    _as_rank(monkeypatch, 0, 1)
    urls, counts = resolve_shards(shards).urls, resolve_shards(shards).counts
    victim, open_ = urls[1], stream._open
    tries = []

    def down(url, spans=None):
        if url == victim:
            tries.append(url)
            raise OSError("503 Slow Down")
        return open_(url, spans)

    monkeypatch.setattr(stream, "_open", down)
    ds = PKBatchDataset(shards, 4, 3, image_size=16)
    reader = stream._EpochReader(ds, 0, 0, 1, 0, SkipCounter())
    with caplog.at_level(logging.WARNING, "distpddm.data"):
        batches = list(reader.run(skip=0))  # the epoch goes on without it
    assert batches and len(tries) == 1 + retry.READ_RETRIES
    assert sleeps == [0.5 * 2**i for i in range(retry.READ_RETRIES)]  # exponential backoff
    assert reader.counter.skipped == counts[1]  # all its samples, counted once
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    spent = f"after {retry.READ_RETRIES} retries"
    assert skipped == [f"skipping {victim}: shard unreadable (OSError: 503 Slow Down) {spent}"]
    assert not {k for b in batches for k in b.keys.tolist()} & set(range(sum(counts[:1]), sum(counts[:2])))
    # Past max_skip_rate the run stops; an outage (most skips after spent retries) is not bad data: Ray may retry.
    with pytest.raises(StorageUnavailable, match=r"did not answer after \d retries; last: .*shard-000001\.tar \(shard "
                       r"unreadable \(OSError: 503 Slow Down\) after"):  # fmt: skip
        _take(PKBatchDataset(shards, 4, 3, image_size=16), 100, workers=0)


def test_the_retries_and_backoff_are_module_settings(shards, monkeypatch, sleeps):
    _as_rank(monkeypatch, 0, 1)
    monkeypatch.setattr(retry, "READ_RETRIES", 2)
    monkeypatch.setattr(retry, "RETRY_BASE_S", 0.01)
    victim, open_ = resolve_shards(shards).urls[0], stream._open
    monkeypatch.setattr(stream, "_open", lambda url, spans=None: _Flaky(open_(url, spans), 0, lambda: url == victim))
    reader = stream._EpochReader(PKBatchDataset(shards, 4, 3, image_size=16), 0, 0, 1, 0, SkipCounter())
    list(reader.run(skip=0))
    assert sleeps == [0.01, 0.02] and "after 2 retries" in reader.counter.last[0]
    assert "Input/output error" in reader.counter.last[0] and victim in reader.counter.last[0]


def test_an_io_error_part_way_through_a_shard_skips_only_what_is_left(shards, monkeypatch, sleeps):
    # A bad sector in the middle of a shard: the samples before it are used, the rest counted as skipped.
    _as_rank(monkeypatch, 0, 1)
    split = resolve_shards(shards)
    victim, open_ = split.urls[0], stream._open
    offsets = stream.load_shard_index(stream.idx_name(victim)).offsets
    bad = 1
    monkeypatch.setattr(
        stream,
        "_open",
        lambda url, spans=None: _Flaky(
            open_(url, spans), int(offsets[bad]) if url == victim else 1 << 60, lambda: True
        ),
    )
    reader = stream._EpochReader(PKBatchDataset(shards, 4, 3, image_size=16), 0, 0, 1, 0, SkipCounter())
    keys = {k for b in reader.run(skip=0) for k in b.keys.tolist()}
    assert reader.counter.skipped == split.counts[0] - bad and len(sleeps) == retry.READ_RETRIES
    assert keys and not keys & set(range(bad, split.counts[0]))


def test_read_range_gives_an_io_error_as_that_samples_result(shards):
    from distpddm.data.tarindex import read_range

    url = resolve_shards(shards).urls[0]
    index = stream.load_shard_index(stream.idx_name(url))
    with open(url, "rb") as raw:
        f = _Flaky(raw, int(index.offsets[1]), lambda: raw.tell() < int(index.offsets[2]))  # only sample 1's bytes
        got = list(read_range(f, index, 0, 3))
    assert [n for n, _ in got] == [0, 1, 2]
    assert isinstance(got[1][1], OSError) and isinstance(got[0][1], dict) and isinstance(got[2][1], dict)


# ------------------------------------------------------------------------ transient HTTP errors (fsspec, aiohttp)


def _http_error(status: int, url: str = "http://store/train/shard-000000.tar"):
    """aiohttp's error for an HTTP status, as fsspec's HTTP filesystem raises it."""
    aiohttp = pytest.importorskip("aiohttp")
    from multidict import CIMultiDict, CIMultiDictProxy
    from yarl import URL

    info = aiohttp.RequestInfo(URL(url), "GET", CIMultiDictProxy(CIMultiDict()))
    return aiohttp.ClientResponseError(info, (), status=status, message="Service Unavailable" if status == 503 else "")


def _not_found_from(error: BaseException, url: str) -> FileNotFoundError:
    """fsspec's report of a failed HEAD and GET: ``FileNotFoundError(url)`` raised from the GET's error."""
    try:
        raise FileNotFoundError(url) from error
    except FileNotFoundError as e:
        return e


def test_which_http_errors_are_retried(monkeypatch):
    aiohttp = pytest.importorskip("aiohttp")
    url = "http://store/train/shard-000000.tar"
    assert retry.is_transient(_http_error(503), url) and retry.is_transient(_http_error(429), url)
    assert not retry.is_transient(_http_error(404), url) and not retry.is_transient(_http_error(403), url)
    assert retry.is_transient(aiohttp.ServerDisconnectedError(), url)
    assert retry.is_transient(aiohttp.ClientPayloadError("Response payload is not completed"), url)
    assert retry.is_transient(aiohttp.ServerTimeoutError("Timeout on reading data from socket"), url)
    assert not retry.is_transient(aiohttp.InvalidURL("http//store"), url)
    # fsspec's FileNotFoundError for a 503: retried on a remote URL; one from a 404, or a local one, is not.
    assert retry.is_transient(_not_found_from(_http_error(503), url), url)
    assert retry.is_transient(_not_found_from(aiohttp.ServerDisconnectedError(), url), url)
    assert not retry.is_transient(_not_found_from(_http_error(404), url), url)
    assert not retry.is_transient(FileNotFoundError(url), url)
    assert not retry.is_transient(_not_found_from(_http_error(503), url), "/data/train/shard-000000.tar")
    assert retry.is_transient(OSError(5, "Input/output error"), "/data/x.tar")
    assert not retry.is_transient(OSError(errno.EINVAL, "InvalidRange"), "s3://bucket/x.tar")  # s3fs's 416
    assert not retry.is_transient(ValueError("stale index"), url)
    message = retry.describe_error(_not_found_from(_http_error(503), url))
    assert message.startswith(f"FileNotFoundError: {url}, from ClientResponseError: 503")
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # not installed (or never imported): OSErrors as before
    assert retry.is_transient(OSError(5, "Input/output error"), url) and not retry.is_transient(ValueError(), url)
    assert not retry.is_transient(FileNotFoundError(url), url)


@pytest.mark.parametrize("where", ["open", "index", "read"])
def test_a_503_from_aiohttp_is_retried_and_changes_no_batch(shards, monkeypatch, sleeps, caplog, where):
    whole = _undisturbed(shards, monkeypatch)
    monkeypatch.setattr(retry, "RETRY_BASE_S", 0.001)
    failed = Counter()  # shard -> failures so far: two 503s each, then it reads
    open_, load = stream._open, stream.load_shard_index

    def twice(url):
        name = url.replace(".idx.npz", ".tar")
        failed[name] += 1
        if failed[name] <= 2:
            raise _http_error(503, url)

    class _Read:  # a shard whose first range read past its first sample answers 503 (raised, not an OSError)
        def __init__(self, f, url):
            self.f, self.url, self.bad_from = f, url, int(load(stream.idx_name(url)).offsets[1])

        def seek(self, pos, whence=0):
            return self.f.seek(pos, whence)

        def read(self, size=-1):
            if self.f.tell() + max(size, 1) > self.bad_from:
                twice(self.url)
            return self.f.read(size)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def flaky_open(url, spans=None):
        if where == "open":
            twice(url)
        return _Read(open_(url, spans), url) if where == "read" else open_(url, spans)

    def flaky_index(url):
        if where == "index":
            twice(url)
        return load(url)

    monkeypatch.setattr(stream, "_open", flaky_open)
    monkeypatch.setattr(stream, "load_shard_index", flaky_index)
    with caplog.at_level(logging.WARNING, "distpddm.data"):
        again = _take(PKBatchDataset(shards, 4, 3, image_size=16, seed=2), 12, workers=0)
    assert failed and all(n >= 3 for n in failed.values())  # each failed twice, then read
    assert all(_same(x, y) for x, y in zip(whole, again, strict=True))
    assert sleeps == [0.001, 0.002] * len(failed)
    assert "ClientResponseError: 503, message='Service Unavailable'" in caplog.text
    assert "skipping" not in caplog.text


@pytest.fixture
def store(shards):
    """The split served over HTTP; set ``store.answer`` to make it fail."""
    pytest.importorskip("aiohttp")
    with fixtures.http_store(shards.parent) as handler:
        handler.url = f"{handler.base}/{shards.name}/index.json"
        yield handler


@pytest.mark.parametrize("fault", ["head_and_get", "get"])
def test_503s_over_http_through_fsspec_are_retried(shards, store, monkeypatch, sleeps, caplog, fault):
    # fsspec reports a 503 to the HEAD and GET that open a file as FileNotFoundError (raised from aiohttp's
    # ClientResponseError), and a 503 to a read as the ClientResponseError itself: both are retried. A shard
    # index is opened (HEAD, then GET); a shard is read by ranged GETs alone (ranges.ReadAhead: no HEAD).
    whole = _undisturbed(shards, monkeypatch)
    index_fails = (lambda nth: nth <= 2) if fault == "head_and_get" else (lambda nth: nth == 2)

    def answer(method, name, nth):
        if name.endswith(".npz"):  # its first HEAD and the GET fsspec tries next, or the GET after a HEAD
            return 503 if index_fails(nth) else None
        return 503 if name.endswith(".tar") and nth == 1 else None  # a shard's first ranged GET

    store.answer = answer
    with caplog.at_level(logging.WARNING, "distpddm.data"):
        again = _take(PKBatchDataset(store.url, 4, 3, image_size=16, seed=2), 12, workers=0)
    assert all(_same(x, y) for x, y in zip(whole, again, strict=True))
    failed = {n for n in store.requests if n.endswith((".tar", ".npz"))}
    assert failed and "skipping" not in caplog.text
    # one retry each, but a range's index fetched ahead of it (stream._NextRange) that failed is read again
    # when due, and that read finds the store answering: no wait
    indexes = {n for n in failed if n.endswith(".npz")}
    assert sleeps == [retry.RETRY_BASE_S] * len(sleeps) and len(failed - indexes) <= len(sleeps) <= len(failed)
    what = "FileNotFoundError" if fault == "head_and_get" else "ClientResponseError: 503"
    assert what in caplog.text and "ClientResponseError: 503" in caplog.text


def test_each_remote_range_is_opened_while_the_one_before_it_is_read(shards, store, monkeypatch):
    """Over HTTP the next shard range's index and first parts are fetched ahead (stream._NextRange): the training
    stream opens only an epoch's first range itself, the eval reader only its first, and both read what they
    read from the local shards."""
    whole = _undisturbed(shards, monkeypatch, n=30)
    opens, open_ = [], stream._open
    monkeypatch.setattr(stream, "_open", lambda url, spans=None: opens.append(url) or open_(url, spans))
    again = _take(PKBatchDataset(store.url, 4, 3, image_size=16, seed=2), 30, workers=0)
    assert all(_same(x, y) for x, y in zip(whole, again, strict=True))
    tars = [n for n in store.requests if n.endswith(".tar")]
    epochs = again[-1].info.epoch + 1
    assert epochs >= 2 and len(tars) > 3 * epochs
    assert len(opens) == epochs  # each epoch's first range; every later one came opened
    local = sorted((int(p), k) for _, _, p, k in EvalDataset(shards, 16))
    opens.clear()  # the eval reader alike: its first range opened, the others fetched ahead
    assert sorted((int(p), k) for _, _, p, k in EvalDataset(store.url, 16)) == local and len(opens) == 1

    ahead = stream._NextRange()  # a range other than the one fetched ahead: not used, and closed
    url = resolve_shards(store.url).urls[0]
    ahead.start(url, resolve_shards(store.url).counts[0], 0, 3, parts=True)
    assert ahead.take(url, 0, 4) == (None, None)
    ahead.close()


def test_a_connection_dropped_mid_body_over_http_is_retried(shards, store, monkeypatch, sleeps, caplog):
    """Every shard's first ranged GET and every shard index's first GET send half their body, then the server
    closes the TCP connection: aiohttp's truncated payload is retried (not bad data) by the training stream
    and the eval reader, and both read what they read from undisturbed shards."""
    whole = _undisturbed(shards, monkeypatch)
    store.answer = lambda method, name, nth: (
        "cut" if method == "GET" and name.endswith((".tar", ".npz")) and nth <= 2 else None
    )
    with caplog.at_level(logging.WARNING, "distpddm.data"):
        again = _take(PKBatchDataset(store.url, 4, 3, image_size=16, seed=2), 12, workers=0)
    assert all(_same(x, y) for x, y in zip(whole, again, strict=True))
    assert sleeps and "skipping" not in caplog.text
    assert "ClientPayloadError" in caplog.text or "ServerDisconnectedError" in caplog.text
    local = sorted((int(p), k) for _, _, p, k in EvalDataset(shards, 16))
    store.requests.clear()
    assert sorted((int(p), k) for _, _, p, k in EvalDataset(store.url, 16)) == local


def test_the_eval_reader_retries_a_503_over_http_and_reads_every_sample(shards, store, sleeps):
    """A shard's first ranged GET answers 503: the eval reader reopens it from that sample (the retry rules
    of the training stream) and reads every sample once; a shard that stays down is skipped and counted."""
    local = sorted((int(p), k) for _, _, p, k in EvalDataset(shards, 16))
    store.answer = lambda method, name, nth: 503 if name.endswith(".tar") and nth == 1 else None
    remote = sorted((int(p), k) for _, _, p, k in EvalDataset(store.url, 16))
    tars = [n for n in store.requests if n.endswith(".tar")]
    assert remote == local and tars and sleeps == [retry.RETRY_BASE_S] * len(tars)
    down = resolve_shards(store.url).urls[0].rsplit("/", 2)
    store.answer = lambda method, name, nth: 503 if name == "/".join(down[-2:]) else None
    reader = EvalDataset(store.url, 16, max_skip_rate=1.0)
    got = sorted(int(p) for _, _, p, _ in reader)
    assert got == [p for p, _ in local if p >= resolve_shards(store.url).counts[0]]


def test_a_shard_that_stays_503_or_404_over_http_is_skipped_with_one_line(shards, store, monkeypatch, sleeps, caplog):
    _as_rank(monkeypatch, 0, 1)
    split = resolve_shards(store.url)
    down, gone = split.urls[0].rsplit("/", 2)[-2:], split.urls[1].rsplit("/", 2)[-2:]
    down, gone = "/".join(down), stream.idx_name("/".join(gone))

    def answer(method, name, nth):
        if name == down:  # the shard answers 503 to every request (its index reads)
            return 503
        return 404 if name == gone else None  # a shard index that is not there: not retried

    store.answer = answer
    reader = stream._EpochReader(PKBatchDataset(store.url, 4, 3, image_size=16), 0, 0, 1, 0, SkipCounter())
    with caplog.at_level(logging.WARNING, "distpddm.data"):
        assert list(reader.run(skip=0))  # the epoch goes on without them
    assert sleeps == [0.5 * 2**i for i in range(retry.READ_RETRIES)]  # the shard answering 503 only
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping")]
    assert len(skipped) == 2 and reader.counter.skipped == split.counts[0] + split.counts[1]
    assert any(f"{gone} (FileNotFoundError: " in m and "404" in m and "retries" not in m for m in skipped)
    spent = f"after {retry.READ_RETRIES} retries"
    assert any("shard unreadable (ClientResponseError: 503" in m and spent in m for m in skipped)
    with pytest.raises((BadDataError, StorageUnavailable), match=r"shard-00000[01]\.(tar|idx\.npz)") as e:
        _take(PKBatchDataset(store.url, 4, 3, image_size=16), 100, workers=0)  # past max_skip_rate: one line
    assert "\n" not in str(e.value)


def test_a_foreign_split_is_left_to_the_foreign_stream(shards, tmp_path):
    """``distpddm shards index`` (layout "foreign"): pre-shuffled, not chunked by class. It resolves (the
    trainer reads it with :class:`distpddm.data.foreign.ForeignPKDataset`, tests/test_foreign_stream.py) but
    has no class-chunked counts: this stream and evaluation refuse it."""
    split = tmp_path / "train"
    split.mkdir()
    index = json.loads((shards / "index.json").read_text()) | {"layout": "foreign", "selection": "samples-x.npz"}
    (split / "index.json").write_text(json.dumps(index))
    for spec in (split, split / "index.json"):
        found = resolve_shards(spec)
        assert found.foreign and found.counts is None and found.split_dir == str(split)
        assert found.digest != resolve_shards(shards).digest
    with pytest.raises(ValueError, match=r"pre-shuffled split indexed in place .*ForeignPKDataset"):
        PKBatchDataset(split, 4, 3, image_size=16)
    with pytest.raises(ValueError, match="evaluation needs"):
        EvalDataset(split)


def test_skips_past_the_rate_are_an_outage_when_most_came_after_spent_retries():
    """Bad data stops a run for good (a DeterministicError: Ray spends no retry); a store that did not answer
    for longer than the retries is an outage: StorageUnavailable, which Ray retries from the last checkpoint."""
    outage = SkipCounter(max_skip_rate=0.04, min_samples=10)
    outage.seen = 100
    outage.skip("s3://b/shard-1.tar", "shard unreadable (503)", 3, unanswered=True)
    with pytest.raises(StorageUnavailable, match=r"5 of 105 samples skipped, 5 of them because the storage"):
        outage.skip("s3://b/shard-2.tar", "shard unreadable (503)", 2, unanswered=True)
    bad = SkipCounter(max_skip_rate=0.02, min_samples=10)
    bad.seen = 100
    bad.skip("s3://b/shard-1.tar", "shard unreadable (503)", 1, unanswered=True)
    with pytest.raises(BadDataError, match=r"3 of 103 samples skipped .*image does not decode"):
        bad.skip("s3://b/shard-2.tar:s7", "image does not decode", 2)
