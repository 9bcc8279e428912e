"""P x K training batches from pre-shuffled (timm-layout) shards indexed in place: class-aware range reads,
disjoint between readers, reproducible, resumable, and what `distpddm train` reads from such a split."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from distpddm.data import wdsbuild
from distpddm.data.foreign import EpochPlan, ForeignPKDataset
from distpddm.data.stream import PKBatchDataset, SkipCounter, StreamState, resolve_shards
from distpddm.data.wdsindex import IndexOptions, index_shards
from tests.test_stream import _as_rank, _same, _take
from tests.test_wdsindex import N_CLASSES, PER_SHARD, timm_shard

SHARDS = 8


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> Path:
    """Eight pre-shuffled shards of six classes (144 samples), indexed in place."""
    root = tmp_path_factory.mktemp("foreign")
    rng = np.random.default_rng(0)
    for s in range(SHARDS):
        timm_shard(root / f"wds-{s:04d}.tar", 100 * s, rng)
    index_shards(str(root / f"wds-{{0000..{SHARDS - 1:04d}}}.tar"), root / "idx", IndexOptions(progress=False))
    return root / "idx" / "train"


@pytest.fixture
def reads(monkeypatch):
    """Every range read, as (url, offset)."""
    seen, lock, real = [], threading.Lock(), wdsbuild.read_range

    def spy(url, offset, size, stop=None):
        with lock:
            seen.append((url, offset))
        return real(url, offset, size, stop)

    monkeypatch.setattr(wdsbuild, "read_range", spy)
    return seen


def _check_shape(batch, P: int, K: int) -> None:
    labels = batch.labels.tolist()
    assert batch.images.shape == (P * K, 3, 16, 16)
    assert len(set(labels)) == P and set(Counter(labels).values()) == {K}
    assert labels == sorted(labels, key=labels.index)  # classes contiguous


def test_readers_read_disjoint_samples_once_per_epoch_in_p_by_k_batches(split, reads):
    index = resolve_shards(split)
    assert index.foreign and index.counts is None and index.samples == SHARDS * PER_SHARD
    ds = ForeignPKDataset(split, 2, 2, image_size=16)
    for epoch in (0, 1):
        reads.clear()
        keys: list[int] = []
        for reader in range(4):  # rank 0 and 1, loader workers 0 and 1 each
            batches = list(EpochPlan(ds, epoch, reader, 4, reader % 2).run(0, SkipCounter()))
            assert len(batches) >= 5 and [b.info.index for b in batches] == list(range(len(batches)))
            for batch in batches:
                _check_shape(batch, 2, 2)
                assert (batch.info.epoch, batch.info.worker) == (epoch, reader % 2)
                keys += batch.keys.tolist()
        assert len(keys) == len(set(keys)) == len(reads) == len(set(reads))  # each sample read once, no reader twice
        assert len(keys) > 0.6 * index.samples and min(keys) >= 0 and max(keys) < index.samples


def test_the_same_seed_gives_the_same_batches_on_every_rank(split, monkeypatch):
    first = {}
    for rank in (0, 1):
        _as_rank(monkeypatch, rank, 2)
        a = _take(ForeignPKDataset(split, 2, 3, image_size=16, seed=3), 6)  # two loader workers
        b = _take(ForeignPKDataset(split, 2, 3, image_size=16, seed=3), 6)
        assert all(_same(x, y) for x, y in zip(a, b, strict=True))
        for batch in a:
            _check_shape(batch, 2, 3)
        first[rank] = {k for batch in a if batch.info.epoch == 0 for k in batch.keys.tolist()}
    assert first[0] and first[1] and not first[0] & first[1]  # ranks read disjoint samples within the epoch
    other = _take(ForeignPKDataset(split, 2, 3, image_size=16, seed=4), 6)
    assert not all(_same(x, y) for x, y in zip(a, other, strict=True))


@pytest.mark.parametrize("stop", [5, 13])
def test_a_resumed_stream_continues_the_uninterrupted_one(split, monkeypatch, stop):
    _as_rank(monkeypatch, 1, 2)
    ds = ForeignPKDataset(split, 2, 2, image_size=16, seed=1)
    whole = _take(ds, 24)
    assert len({b.info.epoch for b in whole}) >= 2  # the stop and the rest cross an epoch boundary
    state = ds.start_state(world=2, workers=2)
    for batch in whole[:stop]:
        state.advance(batch.info)  # what the trainer does with every batch it consumes
    saved = StreamState.from_json(state.to_json())  # as a checkpoint stores it
    resumed = _take(ForeignPKDataset(split, 2, 2, image_size=16, seed=1, start=saved), 24 - stop)
    assert all(_same(x, y) for x, y in zip(whole[stop:], resumed, strict=True))


def test_a_resume_reads_no_image_of_the_batches_before_it(split, reads):
    ds = ForeignPKDataset(split, 2, 2, image_size=16)
    whole = list(EpochPlan(ds, 0, 0, 1, 0).run(0, SkipCounter()))
    reads.clear()
    rest = list(EpochPlan(ds, 0, 0, 1, 0).run(3, SkipCounter()))
    assert all(_same(x, y) for x, y in zip(whole[3:], rest, strict=True))
    assert len(reads) == 4 * len(rest)


def test_a_bad_image_is_replaced_within_its_class_and_counted(split, monkeypatch, caplog):
    ds = ForeignPKDataset(split, 2, 2, image_size=16)
    good = list(EpochPlan(ds, 0, 0, 1, 0).run(0, SkipCounter()))
    bad_key = good[1].keys[0].item()
    i = np.flatnonzero(ds.split.position == bad_key)[0]
    bad = (ds.split.urls[ds.split.names[ds.split.shard[i]]], ds.split.offset[i])
    real = wdsbuild.read_range
    monkeypatch.setattr(
        wdsbuild, "read_range", lambda u, o, s, stop=None: b"not an image" if (u, o) == bad else real(u, o, s)
    )
    counter = SkipCounter()
    again = list(EpochPlan(ds, 0, 0, 1, 0).run(0, counter))
    assert counter.skipped == 1 and "does not decode" in caplog.text
    assert again[1].keys.tolist() == [-1, *good[1].keys.tolist()[1:]]
    assert again[1].labels.tolist() == good[1].labels.tolist()
    assert all(_same(x, y) for n, (x, y) in enumerate(zip(good, again, strict=True)) if n != 1)


def test_the_class_chunked_stream_points_to_the_foreign_one(split):
    with pytest.raises(ValueError, match="ForeignPKDataset"):
        PKBatchDataset(split, 2, 2, image_size=16)
    with pytest.raises(ValueError, match=f"only {N_CLASSES} classes"):
        ForeignPKDataset(split, N_CLASSES + 1, 2, image_size=16)


def test_train_runs_on_a_foreign_split(split, tmp_path):
    overrides = [
        f"data.train_shards={split}",
        f"ray.storage_path={tmp_path}",
        "data.classes_per_batch=2",
        "data.images_per_class=2",
        "train.steps=3",
    ]
    train = subprocess.run(
        [sys.executable, "-m", "distpddm.cli", "train", "--local", "configs/smoke.yaml", *overrides],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    saved = json.loads((tmp_path / "smoke" / "checkpoints" / "step-00000003" / "data_rank0.json").read_text())
    assert saved["layout"]["reads"] == "foreign" and saved["positions"] == {"0": [0, 3]}


def test_eval_reads_every_sample_once_across_ranks_and_workers(split, reads):
    from distpddm.data.evalset import eval_dataset, read_images
    from distpddm.data.foreign import ForeignEvalDataset
    from distpddm.data.wdsbuild import read_selection

    _, shard_of, row_of, label_of = read_selection(split)
    got = []
    for rank in range(2):
        ds = eval_dataset(str(split), 16, rank=rank, world=2)
        assert isinstance(ds, ForeignEvalDataset) and ds.samples == SHARDS * PER_SHARD
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        got += [(int(position), int(label), key, img.shape) for img, label, position, key in loader]
    positions = sorted(p for p, *_ in got)
    assert positions == list(range(SHARDS * PER_SHARD))  # each once, across 2 ranks x 2 loader workers
    assert all(label == label_of[p] and shape == (3, 16, 16) for p, label, _, shape in got)
    keys = {p: key for p, _, key, _ in got}
    with tarfile.open(Path(ForeignEvalDataset(str(split)).split.urls[f"wds-{shard_of[7]:04d}.tar"])) as tar:
        names = [m.name for m in tar.getmembers()]
    assert any(name.startswith(keys[7] + ".") for name in names)  # the key is the sample's tar key
    assert not reads  # the loader workers read (in their processes); here, one reader in this one:
    assert len(list(ForeignEvalDataset(str(split), 16))) == SHARDS * PER_SHARD
    assert len(reads) == len(set(reads)) == SHARDS  # a shard's neighbouring images in one read (under a MiB)
    reads.clear()
    single = list(ForeignEvalDataset(str(split), 16, span_bytes=1))  # each image its own read
    assert len(reads) == len(set(reads)) == SHARDS * PER_SHARD
    assert [(p, key) for _, _, p, key in single] == [(p, key) for _, _, p, key in ForeignEvalDataset(str(split), 16)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(single, ForeignEvalDataset(str(split), 16), strict=True))
    assert ForeignEvalDataset(str(split), 16, limit=10).samples == 10
    thumbs = read_images(str(split), [0, 7])
    assert all(t is not None and max(t.size) <= 64 for t in thumbs)


def test_eval_runs_on_a_foreign_split(split, tmp_path, capsys):
    """`distpddm eval` on a split indexed in place: the same command as for a built one, its report included."""
    from distpddm.cli import main
    from distpddm.loss import PDDMLoss
    from distpddm.model import ModelConfig, create_model, export_model

    torch.manual_seed(0)
    export_model(create_model(ModelConfig(embed_dim=16, small_cnn_width=8)), tmp_path / "model.pt",
                 criterion=PDDMLoss(16), image_size=16)  # fmt: skip
    out = tmp_path / "eval"
    assert main(["eval", str(tmp_path / "model.pt"), "--shards", str(split), "--out", str(out), "--local",
                 "--loader-workers", "0", "--quiet"]) == 0  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == SHARDS * PER_SHARD and 0 <= metrics["recall@1"] <= 1
    assert sorted(np.load(out / "positions.npy").tolist()) == list(range(SHARDS * PER_SHARD))


def test_validation_passes_open_the_eval_split_once(split, tmp_path, monkeypatch):
    """Each validation pass builds a new eval reader; the split behind it (a check of every shard, a HEAD
    each over HTTP, and its per-shard indexes read) is opened once per process, and again when re-indexed."""
    import os
    import shutil

    from distpddm.data import foreign

    copy = tmp_path / "idx"
    shutil.copytree(split.parent, copy)
    checks = Counter()
    real = foreign.shard_urls
    monkeypatch.setattr(foreign, "shard_urls", lambda d, s: checks.update([str(d)]) or real(d, s))
    first, second = (foreign.ForeignEvalDataset(str(copy / "train"), 16) for _ in range(2))
    assert first.split is second.split and sum(checks.values()) == 1
    stat = (copy / "train" / "index.json").stat()
    os.utime(copy / "train" / "index.json", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # indexed again
    third = foreign.ForeignEvalDataset(str(copy / "train"), 16)
    assert third.split is not first.split and sum(checks.values()) == 2
    assert ForeignPKDataset(str(copy / "train"), 2, 2, image_size=16).split is not third.split


def test_a_bad_read_is_described_and_raised_without_a_signed_url_s_secrets():
    """A shard URL may be presigned (its signature a credential, valid until it expires): a read error is
    described redacted, and the error raised past the skip threshold does not carry the raw one (Ray prints
    tracebacks, contexts included, without distpddm's log filter)."""
    import traceback

    from distpddm.data.foreign import read_image
    from distpddm.data.retry import describe_error
    from distpddm.data.stream import SkipCounter
    from distpddm.errors import BadDataError

    signed = "https://store.example/b/x.tar?X-Amz-Security-Token=T0K3N&X-Amz-Signature=51GN"

    def read(source):
        raise FileNotFoundError(signed)

    assert "51GN" not in describe_error(FileNotFoundError(signed)) and "X-Amz-Signature=***" in describe_error(
        FileNotFoundError(signed)
    )
    counter = SkipCounter(max_skip_rate=0.0, min_samples=1)
    with pytest.raises(BadDataError) as raised:
        read_image(read, "x.tar/s.img@0+10", "https://store.example/b/x.tar@0", lambda raw: raw, counter)
    shown = "".join(traceback.format_exception(raised.value))
    assert "x.tar" in shown and "T0K3N" not in shown and "51GN" not in shown


def test_spans_join_neighbouring_images_of_a_shard_up_to_a_size():
    from distpddm.data.foreign import spans

    shard = np.array([0, 0, 0, 0, 1, 1, 1])
    offset = np.array([0, 110, 5000, 5100, 0, 100, 200])
    size = np.array([100, 100, 100, 100, 100, 100, 900])

    def starts(**kw):
        return spans(shard, offset, size, **kw)[0].tolist()

    assert starts(gap=1000, most=10**6) == [0, 2, 4]  # a gap, a new shard
    assert spans(shard, offset, size, gap=1000, most=10**6)[1].tolist() == [210, 5200, 1100]  # each read's end
    assert starts(gap=10**6, most=10**6) == [0, 4]
    assert starts(gap=1000, most=200) == [0, 1, 2, 4, 6]  # 210 bytes > 200, 200 not
    assert starts(gap=1000, most=300) == [0, 2, 4, 6]  # the 900-byte image alone
    nested = spans(np.array([0, 0, 0]), np.array([0, 10, 500]), np.array([400, 10, 10]), gap=50)
    assert nested[0].tolist() == [0, 2] and nested[1].tolist() == [400, 510]  # the furthest end, not the last's
    assert [a.tolist() for a in spans(shard[:0], offset[:0], size[:0])] == [[], []]


@pytest.mark.parametrize("span_bytes", [1, 150_000, 10**6])
def test_eval_reads_the_same_images_however_they_are_joined(split, monkeypatch, span_bytes):
    """Reads of a few images each, cut at KEY_BLOCK boundaries and between 3 ranks, give what one read per image
    gives."""
    from distpddm.data import foreign

    def read_all(**kw):
        return [(p, key, img) for rank in range(3) for img, _, p, key in
                foreign.ForeignEvalDataset(str(split), 16, rank=rank, world=3, **kw)]  # fmt: skip

    single = read_all(span_bytes=1)
    monkeypatch.setattr(foreign, "KEY_BLOCK", 5)
    joined = read_all(span_bytes=span_bytes)
    assert [(p, k) for p, k, _ in joined] == [(p, k) for p, k, _ in single] and len(single) == SHARDS * PER_SHARD
    assert all(torch.equal(a, b) for (_, _, a), (_, _, b) in zip(joined, single, strict=True))


def test_a_failed_read_of_several_images_is_read_again_image_by_image(split, monkeypatch, caplog):
    """A joined read that fails (retries spent) costs no image when each image reads alone; where the store
    does not answer those either, its images are skipped, each named, after one try of the first alone."""
    from distpddm.data.foreign import ForeignEvalDataset

    ds = ForeignEvalDataset(str(split), 16)
    bad = ds.split.urls[ds.split.names[int(ds.split.shard[ds.order[0]])]]  # the first shard read
    in_bad = int((ds.split.shard == ds.split.shard[ds.order[0]]).sum())
    real, tries = wdsbuild.read_range, []

    def joined_reads_fail(url, offset, size, stop=None):
        if url == bad and size > 200_000:  # a read of several images (each ~50 KB)
            raise ConnectionResetError("reset by peer")
        return real(url, offset, size, stop)

    monkeypatch.setattr(wdsbuild, "read_range", joined_reads_fail)
    assert len(list(ForeignEvalDataset(str(split), 16))) == SHARDS * PER_SHARD  # none lost

    def shard_down(url, offset, size, stop=None):
        if url == bad:
            tries.append(size)
            raise ConnectionResetError("reset by peer")
        return real(url, offset, size, stop)

    monkeypatch.setattr(wdsbuild, "read_range", shard_down)
    got = list(ForeignEvalDataset(str(split), 16, max_skip_rate=0.5))
    assert len(got) == SHARDS * PER_SHARD - in_bad
    assert sum("skipping" in r.message and "reset by peer" in r.message for r in caplog.records) == in_bad
    assert len(tries) == 1 + 1  # the joined read, then its first image alone: the rest are not tried
