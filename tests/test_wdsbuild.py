"""Re-chunking published (timm-layout) WebDataset shards indexed in place into the class-chunked layout:
`distpddm shards build --source wds-index`, against a plain tarfile read of the source shards, locally and over
HTTP (nginx, as tests/test_wdsindex.py runs it), read by the training stream and by a short training run."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distpddm.cli import main as cli
from distpddm.data import ranges, retry, stream, wdsbuild
from distpddm.data.shards import BuildOptions, build, encode_image, verify
from distpddm.data.stream import PKBatchDataset
from distpddm.data.wdsbuild import parse_source, read_range, read_wds_index
from distpddm.data.wdsindex import IndexOptions, index_shards
from tests import test_wdsindex as wi

nginx = wi.nginx  # the fixture: it serves this module's ``source``
s3 = wi.s3  # moto's S3 server

REPO = Path(__file__).resolve().parents[1]
SHARDS = [f"in12k-train-000{n}.tar" for n in range(3)]
PATTERN = "in12k-train-{0000..0002}.tar"
OPTS = {"shard_bytes": 120_000, "chunk_size": 2, "progress": False}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Three good shards of 18 pre-shuffled samples: JPEG (PAX), WEBP (GNU, fields in another order), JPEG
    (ustar, the class only in the json's file name); keys with dots and class folders."""
    src = tmp_path_factory.mktemp("wds")
    rng = np.random.default_rng(1)
    wi.timm_shard(src / SHARDS[0], 0, rng)
    wi.timm_shard(src / SHARDS[1], 100, rng, "webp", ("cls", "json", "img"), fmt=tarfile.GNU_FORMAT)
    wi.timm_shard(src / SHARDS[2], 200, rng, fmt=tarfile.USTAR_FORMAT)
    return src


@pytest.fixture(scope="module")
def indexed(source, tmp_path_factory) -> Path:
    """The source indexed in place, with a val split carved on the index (two foreign splits)."""
    out = tmp_path_factory.mktemp("idx")
    index_shards(str(source / PATTERN), out, IndexOptions(progress=False, val_per_class=1))
    return out


def truth(source: Path) -> dict[str, tuple[str, bytes]]:
    """Every sample of the source shards, by the builder's source string: (class name, image bytes)."""
    out = {}
    for name in SHARDS:
        good, bad = wi.tarfile_truth(source / name)
        assert not bad
        with tarfile.open(source / name) as tar:
            members = {m.name: m for m in tar if m.isfile()}
            for g in good:
                offset, size = g["image"]
                ext = next(e for e in ("jpg", "webp") if f"{g['key']}.{e}" in members)
                image = tar.extractfile(members[f"{g['key']}.{ext}"]).read()
                out[f"{name}/{g['key']}.{ext}@{offset}+{size}"] = (wi.WNIDS[g["label"]], image)
    return out


def built_samples(split_dir: Path) -> list[dict]:
    """A built split's samples, read with tarfile: label, class name, source, image bytes and extension."""
    index = json.loads((split_dir / "index.json").read_text())
    samples = []
    for shard in index["shards"]:
        fields: dict[str, dict[str, bytes]] = {}
        with tarfile.open(split_dir / shard["name"]) as tar:
            for m in tar:
                key, _, field = m.name.partition(".")
                fields.setdefault(key, {})[field] = tar.extractfile(m).read()
        for f in fields.values():
            meta = json.loads(f["json"])
            ext = next(e for e in f if e not in ("cls", "json"))
            label = int(f["cls"])
            assert index["classes"][label] == meta["class_name"]
            samples.append({"label": label, "meta": meta, "image": f[ext], "ext": ext})
    return samples


def assert_built_from(out: Path, indexed: Path, source: Path, max_side: int | None) -> None:
    """Every sample of every indexed split is in the built split of that name once, with its class and its
    image (the very bytes, or the builder's re-encoding of them)."""
    want = truth(source)
    for split in ("train", "val"):
        foreign = json.loads((indexed / split / "index.json").read_text())
        built = json.loads((out / split / "index.json").read_text())
        assert built["classes"] == foreign["classes"] and built["class_counts"] == foreign["class_counts"]
        assert built["source_kind"] == "wds-index" and built["carving"] == foreign["carving"]
        samples = built_samples(out / split)
        sources = [s["meta"]["source"] for s in samples]
        assert len(sources) == foreign["samples"] == len(set(sources))  # each once
        for s in samples:
            name, image = want.pop(s["meta"]["source"])
            assert s["meta"]["class_name"] == name
            if max_side is None:
                assert s["image"] == image and s["ext"] == parse_source(s["meta"]["source"])[3]
                continue
            expected, ext, width, height = encode_image(image, "jpg", max_side, 90)
            assert s["image"] == expected and s["ext"] == ext == "jpg"
            with Image.open(io.BytesIO(s["image"])) as img:
                assert img.size == (width, height) == (max_side, max_side)  # 224 x 224 sources
    assert not want  # and nothing of the source is missing


def test_build_from_an_index_equals_a_tarfile_read(source, indexed, tmp_path, monkeypatch):
    plan = read_wds_index(indexed)
    assert set(plan.splits) == {"train", "val"} and plan.carving["val_per_class"] == 1
    options = BuildOptions(**OPTS, workers=2)  # two worker processes, each with its reads in flight
    indexes = build(plan, tmp_path / "out", options)
    sizes = [s["bytes"] for s in indexes["train"]["shards"]]  # cut by the images' sizes, as for the other sources
    assert len(sizes) >= 10 and max(sizes) < 2 * OPTS["shard_bytes"]
    assert_built_from(tmp_path / "out", indexed, source, max_side=None)
    assert all(r.ok for r in verify(tmp_path / "out", progress=False))

    # The class-chunked stream reads it: P x K batches of the split's labels.
    shard_set = stream.resolve_shards(tmp_path / "out" / "train")
    assert shard_set.chunk_size == 2 and sum(shard_set.counts) == indexes["train"]["samples"]
    images, labels, _, _ = next(iter(stream.PKBatchDataset(shard_set, 2, 2, image_size=16)))
    assert images.shape == (4, 3, 16, 16) and sorted(Counter(labels.tolist()).values()) == [2, 2]

    # A rerun finds every shard built (the sidecars match the plan): no image is read again.
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*/shard-*.tar")}
    monkeypatch.setattr(wdsbuild, "read_range", lambda *a: pytest.fail("a finished shard was read again"))
    build(read_wds_index(indexed), tmp_path / "out", options)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("*/shard-*.tar")} == before


def test_cli_build_resized_then_train(source, indexed, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["shards", "build", "--source", "wds-index", str(indexed), str(out), "--quiet", "--max-side", "32"]
    assert cli([*argv, "--shard-size", "20k", "--chunk-size", "2", "--workers", "1", "--in-flight", "3"]) == 0
    printed = capsys.readouterr().out
    assert "train: 48 images, 6 classes" in printed and "val: 6 images, 6 classes" in printed
    assert_built_from(out, indexed, source, max_side=32)
    overrides = [
        f"data.train_shards={out / 'train'}",
        f"ray.storage_path={tmp_path}",
        "data.classes_per_batch=2",
        "data.images_per_class=2",
        "train.steps=2",
        "train.log_every=1",
        "data.loader_workers=0",
    ]
    train = subprocess.run(
        [sys.executable, "-m", "distpddm.cli", "train", "--local", "configs/smoke.yaml", *overrides],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "done: step 2" in train.stdout


def test_one_split_folder_and_refusals(source, indexed, tmp_path, capsys):
    plan = read_wds_index(indexed / "val")  # the split folder alone
    assert set(plan.splits) == {"val"} and len(plan.splits["val"]) == 6
    assert cli(["shards", "build", "--source", "wds-index", str(tmp_path), str(tmp_path / "o"), "--quiet"]) == 2
    assert "run `distpddm shards index SRC FOLDER` first" in capsys.readouterr().err


def test_transient_read_errors_are_retried_persistent_ones_not(source, monkeypatch):
    monkeypatch.setattr(retry, "_sleep", lambda s: None)
    url = str(source / SHARDS[0])
    real, calls = ranges._read_local, []

    def flaky(path, offset, size):
        calls.append(offset)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return real(path, offset, size)

    monkeypatch.setattr(ranges, "_read_local", flaky)
    assert read_range(url, 512, 100) == (source / SHARDS[0]).read_bytes()[512:612] and len(calls) == 3
    calls.clear()
    with pytest.raises(FileNotFoundError):
        read_range(str(source / "gone.tar"), 0, 10)
    with pytest.raises(ValueError, match="shorter than when it was indexed"):
        read_range(url, (source / SHARDS[0]).stat().st_size - 10, 100)


def test_build_over_http_equals_local(source, tmp_path, nginx, monkeypatch):
    base, _ = nginx
    index_shards(f"{base}/{PATTERN}", tmp_path / "idx", IndexOptions(progress=False, val_per_class=1))
    plan = read_wds_index(tmp_path / "idx")
    assert plan.reader.urls[SHARDS[0]] == f"{base}/{SHARDS[0]}"
    build(plan, tmp_path / "out", BuildOptions(**OPTS, workers=2))
    assert_built_from(tmp_path / "out", tmp_path / "idx", source, max_side=None)

    # Training without a copy reads the same batches over HTTP as from the local shards.
    from distpddm.data.foreign import ForeignPKDataset
    from tests.test_stream import _as_rank, _same, _take

    _as_rank(monkeypatch, 0, 1)
    index_shards(str(source / PATTERN), tmp_path / "local", IndexOptions(progress=False, val_per_class=1))
    local, remote = (
        _take(ForeignPKDataset(str(tmp_path / where / "train"), 2, 2, image_size=16, seed=1, in_flight=4), 4, workers=0)
        for where in ("local", "idx")
    )
    assert len(local) == 4 and all(_same(x, y) for x, y in zip(local, remote, strict=True))
    assert base in ranges._RANGES_HONOURED  # checked once per folder; later reads are plain ranged GETs

    # A server that ignores ranges would send a whole shard for every image: refused at the first image, before
    # its body is read, by the builder (also with --skip-bad) and by training's reader alike, naming why.
    index_shards(f"{base}/noranges/{PATTERN}", tmp_path / "idx2", IndexOptions(progress=False))
    for skip_bad in (False, True):
        with pytest.raises(ranges.RangesIgnored, match="ignores HTTP range requests"):
            build(read_wds_index(tmp_path / "idx2"), tmp_path / "out2", BuildOptions(**OPTS, workers=1,
                                                                                       skip_bad=skip_bad))  # fmt: skip
    with pytest.raises(ranges.RangesIgnored, match="ignores HTTP range requests"):
        next(iter(ForeignPKDataset(str(tmp_path / "idx2" / "train"), 2, 2, image_size=16)))
    assert f"{base}/noranges" not in ranges._RANGES_HONOURED


def test_a_connection_dropped_mid_image_is_retried_by_the_foreign_readers(source, indexed, tmp_path, monkeypatch):
    """A split indexed in place over HTTP, read while the server sends half of the first image of every shard
    and then closes the TCP connection: training and eval without a copy read what the local shards give."""
    from distpddm.data.foreign import ForeignEvalDataset, ForeignPKDataset
    from tests import fixtures
    from tests.test_stream import _as_rank, _same, _take

    _as_rank(monkeypatch, 0, 1)
    monkeypatch.setattr(retry, "RETRY_BASE_S", 0.001)  # the readers' retries wait on a stop event or the loop
    with fixtures.http_store(source) as store:
        index_shards(f"{store.base}/{PATTERN}", tmp_path / "http", IndexOptions(progress=False, val_per_class=1))
        gets = Counter()

        def answer(method, name, nth):  # the first image GET of each shard after this point is cut mid-body
            gets[name] += method == "GET"
            return "cut" if method == "GET" and gets[name] == 1 else None

        for split in ("train", "val"):
            gets.clear()
            store.answer = answer
            if split == "train":
                local, remote = (
                    _take(ForeignPKDataset(str(where / "train"), 2, 2, image_size=16, seed=1, in_flight=4), 4, 0)
                    for where in (indexed, tmp_path / "http")
                )
                assert len(local) == 4 and all(_same(x, y) for x, y in zip(local, remote, strict=True))
            else:
                local, remote = (
                    sorted((int(p), int(y), k) for _, y, p, k in ForeignEvalDataset(str(where / "val"), 16))
                    for where in (indexed, tmp_path / "http")
                )
                assert local and local == remote
            assert gets and all(n >= 2 for n in gets.values())  # each cut read was asked for again


def test_training_and_evaluation_read_from_s3(source, tmp_path, s3, monkeypatch):
    """Both layouts over the S3 API (moto's server, through s3fs) give what the local files give: a split
    indexed in place (training and evaluation without a copy) and a built, class-chunked one."""
    from distpddm.data.evalset import EvalDataset
    from distpddm.data.foreign import ForeignEvalDataset, ForeignPKDataset
    from tests.test_stream import _as_rank, _same, _take

    _as_rank(monkeypatch, 0, 1)
    for name in SHARDS:
        s3.put(str(source / name), f"shards/{name}")
    options = IndexOptions(progress=False, val_per_class=1)
    index_shards(f"s3://shards/{PATTERN}", tmp_path / "s3", options)
    index_shards(str(source / PATTERN), tmp_path / "local", options)
    local, remote = (
        _take(ForeignPKDataset(str(tmp_path / where / "train"), 2, 2, image_size=16, seed=1), 3, workers=0)
        for where in ("local", "s3")
    )
    assert len(local) == 3 and all(_same(x, y) for x, y in zip(local, remote, strict=True))
    fs, _ = ranges.url_to_fs(f"s3://shards/{SHARDS[0]}")  # the client those reads went through
    assert fs.s3.meta.config.max_pool_connections == ranges.S3_CONNECTIONS  # not aiobotocore's 10: 64 in flight
    local, remote = (
        sorted((int(p), int(y), k) for _, y, p, k in ForeignEvalDataset(str(tmp_path / where / "val"), 16))
        for where in ("local", "s3")
    )
    assert local and local == remote

    build(read_wds_index(tmp_path / "local"), tmp_path / "built", BuildOptions(**OPTS))
    s3.put(str(tmp_path / "built" / "train"), "shards/built/train", recursive=True)
    url = "s3://shards/built/train/index.json"
    local, remote = (
        _take(PKBatchDataset(where, 2, 2, image_size=16, seed=1), 3, workers=0)
        for where in (str(tmp_path / "built" / "train"), url)
    )
    assert all(_same(x, y) for x, y in zip(local, remote, strict=True))
    local, remote = (
        [(int(p), k) for _, _, p, k in EvalDataset(where, 16)] for where in (str(tmp_path / "built" / "train"), url)
    )
    assert local and local == remote

    from distpddm.data.sources import SourceError

    changed = bytearray((source / SHARDS[0]).read_bytes())
    changed[-1] ^= 1  # the same size, other bytes: S3's ETag (the content's MD5) changes
    s3.pipe(f"shards/{SHARDS[0]}", bytes(changed))
    with pytest.raises(SourceError, match=rf"{SHARDS[0]} has ETag .* when it was indexed: index it again"):
        ForeignPKDataset(str(tmp_path / "s3" / "train"), 2, 2, image_size=16)


def test_a_forked_reader_leaves_the_parents_connections_alone(source, nginx):
    """A DataLoader worker drops the fsspec filesystems it copied from the trainer; closing their pooled
    connections there would take the trainer's sockets out of the epoll instance both share, and the trainer's
    next request (its validation pass) would wait forever. ranges pins the copies in the child."""
    import multiprocessing
    import threading

    base, _ = nginx
    url = f"{base}/{SHARDS[0]}"
    assert len(ranges.read_range(url, 0, 512)) == 512  # a kept-alive connection, pooled in this process

    def child():
        fs, path = ranges.url_to_fs(url)  # a new filesystem here: the copies are dropped from the caches
        fs.cat_file(path, start=0, end=512)
        import gc

        gc.collect()

    proc = multiprocessing.get_context("fork").Process(target=child)
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(ranges.read_range(url, 512, 512)), daemon=True)
    reader.start()
    reader.join(20)
    assert got == [(source / SHARDS[0]).read_bytes()[512:1024]], "the parent's request hung after the fork"


def test_a_shard_changed_since_it_was_indexed_is_named(source, tmp_path, nginx, caplog):
    """Offsets into a changed shard would read the wrong bytes: its size is checked when the split is opened,
    and its ETag too (an HTTP ETag that differs is a warning: mirrors tag one file differently; S3's is the
    content's hash, below in test_training_and_evaluation_read_from_s3)."""
    import logging
    import os

    from distpddm.data.foreign import ForeignPKDataset
    from distpddm.data.sources import SourceError

    base, _ = nginx
    index_shards(f"{base}/{PATTERN}", tmp_path / "idx", IndexOptions(progress=False))
    split = tmp_path / "idx" / "train"
    shard = json.loads((split / "index.json").read_text())["shards"][1]
    assert shard["etag"] and shard["bytes"] == (source / shard["name"]).stat().st_size
    ForeignPKDataset(str(split), 2, 2, image_size=16)  # as indexed: it opens
    path, st = source / shard["name"], (source / shard["name"]).stat()
    os.utime(path, (st.st_atime, st.st_mtime + 100))  # rewritten in place, same size: nginx's ETag changes
    try:
        with caplog.at_level(logging.WARNING, "distpddm.data"):
            ForeignPKDataset(str(split), 2, 2, image_size=16)
        assert f"{shard['name']} has ETag" in caplog.text and "index it again" in caplog.text
        with path.open("ab") as f:
            f.write(bytes(512))  # and now longer
        with pytest.raises(SourceError, match=rf"{shard['name']} has {st.st_size + 512} bytes, {st.st_size} when"):
            ForeignPKDataset(str(split), 2, 2, image_size=16)
        with pytest.raises(SourceError, match="when it was indexed"):
            read_wds_index(tmp_path / "idx")  # and the builder's reader
    finally:
        os.truncate(path, st.st_size)
        os.utime(path, (st.st_atime, st.st_mtime))
    index_shards(str(source / PATTERN), tmp_path / "local", IndexOptions(progress=False))
    local = tmp_path / "local" / "train"
    (source / "in12k-train-0000.tar").rename(tmp_path / "moved.tar")
    try:
        with pytest.raises(SourceError, match=r"in12k-train-0000.tar of .*FileNotFoundError"):
            ForeignPKDataset(str(local), 2, 2, image_size=16)
    finally:
        (tmp_path / "moved.tar").rename(source / "in12k-train-0000.tar")


def test_reads_are_in_flight_together_and_in_the_builders_order(indexed, tmp_path, monkeypatch):
    import threading
    import time

    real, lock = wdsbuild.read_range, threading.Lock()
    running, most, order = [0], [0], []

    def slow(url, offset, size, stop=None):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            order.append((Path(url).name, offset))
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return real(url, offset, size, stop)

    monkeypatch.setattr(wdsbuild, "read_range", slow)
    plan = read_wds_index(indexed / "train", in_flight=4)
    index = build(plan, tmp_path / "out", BuildOptions(**OPTS, workers=1))["train"]  # in this process
    assert 2 <= most[0] <= 4  # several reads at once, never more than asked for
    written = [parse_source(s["meta"]["source"])[:2] for s in built_samples(tmp_path / "out" / "train")]
    assert sorted(order) == sorted(written) and len(order) == index["samples"] == len(set(order))
    position = {sample: n for n, sample in enumerate(written)}
    assert all(abs(position[sample] - n) < 4 for n, sample in enumerate(order))  # in the shards' order


def test_a_byte_budget_bounds_the_bytes_read_ahead(tmp_path, monkeypatch):
    """``prefetch(sources, max_bytes)``: reads start while the pending ones hold less than the budget (one at
    least, however large), and every source is still read once, in order."""
    import threading
    import time

    blob = tmp_path / "blob.tar"
    blob.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    real, lock = wdsbuild.read_range, threading.Lock()
    started, most = [], [0]

    def slow(url, offset, size, stop=None):
        with lock:
            started.append(offset)
        time.sleep(0.01)
        return real(url, offset, size, stop)

    monkeypatch.setattr(wdsbuild, "read_range", slow)
    sizes = [1000] * 20 + [300_000] + [1000] * 5
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    sources = [f"blob.tar/s.img@{o}+{n}" for o, n in zip(offsets, sizes, strict=True)]
    fetcher = wdsbuild.RangeFetcher({"blob.tar": str(blob)}, in_flight=16)
    got = []
    with fetcher.prefetch(sources, max_bytes=4000) as read:
        for n, source in enumerate(sources):
            with lock:
                ahead = [offsets.index(o) for o in started if o >= offsets[n]]  # started, not yet taken
            if ahead:  # what they held before the last of them started
                most[0] = max(most[0], sum(sizes[i] for i in ahead) - sizes[max(ahead)])
            got.append(read(source)[0])
    assert got == [blob.read_bytes()[o : o + n] for o, n in zip(offsets, sizes, strict=True)]
    assert sorted(started) == offsets  # each once
    assert 1000 <= most[0] < 4000  # reads ahead, none started past the budget (16 of 1000 bytes without it)
