import json
import os
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from distpddm.cli import main as cli
from distpddm.data.shards import BuildOptions, build
from distpddm.data.sources import SourceError, read_source
from tests import fixtures


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return fixtures.glyph_images(12, 6, tmp_path_factory.mktemp("glyph-cache"))


def read_all(split_dir: Path) -> dict[str, dict]:
    """Every sample in a split's shards, by key, with the shard it came from."""
    index = json.loads((split_dir / "index.json").read_text())
    out = {}
    for shard in index["shards"]:
        for sample in wds.WebDataset(str(split_dir / shard["name"]), shardshuffle=False, empty_check=False):
            assert sample["__key__"] not in out
            out[sample["__key__"]] = sample | {"shard": shard["name"]}
    return out


def sources_of(split_dir: Path) -> dict[str, tuple[int, str, dict]]:
    index = json.loads((split_dir / "index.json").read_text())
    result = {}
    for s in read_all(split_dir).values():
        meta = json.loads(s["json"])
        label = int(s["cls"])
        assert index["classes"][label] == meta["class_name"]
        assert meta["source"] not in result, "a source image landed twice"
        result[meta["source"]] = (label, meta["class_name"], s)
    return result


OPTS = BuildOptions(shard_bytes=20_000, progress=False, workers=2)


def test_folder_round_trip_keeps_bytes(tmp_path, images):
    truth = fixtures.make_folder(tmp_path / "src", images)
    build(read_source("folder", tmp_path / "src"), tmp_path / "out", OPTS)
    got = sources_of(tmp_path / "out" / "train")
    assert set(got) == set(truth)
    for rel, (_, name, sample) in got.items():
        assert name == truth[rel]
        assert sample["jpg"] == (tmp_path / "src" / rel).read_bytes()  # stored as it was
        meta = json.loads(sample["json"])
        assert (meta["width"], meta["height"]) == (48, 40)
    index = json.loads((tmp_path / "out" / "train" / "index.json").read_text())
    assert len(index["shards"]) > 1 and sum(s["samples"] for s in index["shards"]) == len(truth)
    assert index["class_counts"] == [6] * 12


def test_imagenet_layout_follows_the_synset_order(tmp_path, images):
    truth, synsets = fixtures.make_imagenet(tmp_path / "src", images[:5])
    build(read_source("imagenet", tmp_path / "src", synsets=synsets), tmp_path / "out", OPTS)
    index = json.loads((tmp_path / "out" / "train" / "index.json").read_text())
    assert index["classes"] == [line.split()[0] for line in synsets.read_text().splitlines()]
    got = sources_of(tmp_path / "out" / "train")
    assert set(got) == set(truth)
    assert all(name == truth[rel] for rel, (_, name, _) in got.items())


def test_cub_is_split_by_class_id(tmp_path, images):
    ids = [1, 2, 100, 101, 150, 200]
    truth = fixtures.make_cub(tmp_path / "src", images[:6], ids)
    build(read_source("cub", tmp_path / "src"), tmp_path / "out", OPTS)
    train, test = sources_of(tmp_path / "out" / "train"), sources_of(tmp_path / "out" / "test")
    assert set(train) | set(test) == set(truth) and not set(train) & set(test)
    assert {truth[r][1] for r in train} == {1, 2, 100} and {truth[r][1] for r in test} == {101, 150, 200}
    assert all(name == truth[rel][0] for rel, (_, name, _) in (train | test).items())


def test_cars_is_split_by_class_id(tmp_path, images):
    ids = [1, 50, 98, 99, 196]
    truth = fixtures.make_cars(tmp_path / "src", images[:5], ids)
    build(read_source("cars", tmp_path / "src"), tmp_path / "out", OPTS)
    train, test = sources_of(tmp_path / "out" / "train"), sources_of(tmp_path / "out" / "test")
    assert set(train) | set(test) == set(truth) and not set(train) & set(test)
    assert {truth[r][1] for r in train} == {1, 50, 98} and {truth[r][1] for r in test} == {99, 196}
    assert all(name == truth[rel][0] for rel, (_, name, _) in (train | test).items())


def test_sop_uses_its_split_files(tmp_path, images):
    truth = fixtures.make_sop(tmp_path / "src", images[:4], images[4:7])
    build(read_source("sop", tmp_path / "src"), tmp_path / "out", OPTS)
    for split in ("train", "test"):
        got = sources_of(tmp_path / "out" / split)
        assert set(got) == {r for r, (_, s) in truth.items() if s == split}
        assert all(name == truth[rel][0] for rel, (_, name, _) in got.items())


def test_fonts_render_disjoint_splits_through_the_cli(tmp_path, capsys):
    fixtures.copy_fonts(tmp_path / "fonts", 6)
    rc = cli(
        [
            "shards",
            "build",
            "--source",
            "fonts",
            str(tmp_path / "fonts"),
            str(tmp_path / "out"),
            "--font-size",
            "32",
            "--shard-size",
            "200k",
            "--quiet",
        ]
    )
    assert rc == 0
    train, test = sources_of(tmp_path / "out" / "train"), sources_of(tmp_path / "out" / "test")
    assert len(train) + len(test) == 6 * 62
    assert not {n for _, n, _ in train.values()} & {n for _, n, _ in test.values()}
    assert "train:" in capsys.readouterr().out
    assert cli(["shards", "verify", str(tmp_path / "out"), "--quiet"]) == 0


def test_max_side_reencodes_smaller_jpegs(tmp_path, images):
    fixtures.make_folder(tmp_path / "src", images[:3])
    build(read_source("folder", tmp_path / "src"), tmp_path / "out", BuildOptions(max_side=20, progress=False))
    for s in read_all(tmp_path / "out" / "train").values():
        meta = json.loads(s["json"])
        assert max(meta["width"], meta["height"]) == 20 and "jpg" in s


def test_chunks_are_class_contiguous_and_deterministic(tmp_path, images):
    fixtures.make_folder(tmp_path / "src", images)
    plan = read_source("folder", tmp_path / "src")
    opts = BuildOptions(shard_bytes=10**9, chunk_size=3, seed=7, progress=False)
    build(plan, tmp_path / "a", opts)
    build(plan, tmp_path / "b", opts)
    ia = json.loads((tmp_path / "a" / "train" / "index.json").read_text())
    ib = json.loads((tmp_path / "b" / "train" / "index.json").read_text())
    assert [s["sha256"] for s in ia["shards"]] == [s["sha256"] for s in ib["shards"]]
    labels = [int(s["cls"]) for _, s in sorted(read_all(tmp_path / "a" / "train").items())]
    runs = [labels[i : i + 3] for i in range(0, len(labels), 3)]
    assert all(len(set(r)) == 1 for r in runs)  # every chunk of 3 is one class
    assert labels != sorted(labels)  # and chunk order is shuffled
    with tarfile.open(tmp_path / "a" / "train" / "shard-000000.tar") as tar:  # plain ustar headers: no PAX
        assert not any(m.pax_headers for m in tar.getmembers())  # records that readers parse in Python


def test_resume_rebuilds_only_unfinished_shards(tmp_path, images):
    fixtures.make_folder(tmp_path / "src", images)
    plan = read_source("folder", tmp_path / "src")
    index = build(plan, tmp_path / "out", OPTS)["train"]
    split = tmp_path / "out" / "train"
    victim = split / index["shards"][1]["name"]
    keep = split / index["shards"][0]["name"]
    # A crash mid-shard: the finished tar is gone, a partial temporary file is left, no index.
    victim.unlink()
    victim.with_suffix(".json").unlink()
    victim.with_suffix(".tar.tmp").write_bytes(b"partial")
    (split / "index.json").unlink()
    before = keep.stat().st_mtime_ns
    again = build(plan, tmp_path / "out", OPTS)["train"]
    assert keep.stat().st_mtime_ns == before  # finished shards are skipped
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in index["shards"]]
    assert not victim.with_suffix(".tar.tmp").exists()


def test_verify_reports_corruption_and_fails(tmp_path, images, capsys):
    fixtures.make_folder(tmp_path / "src", images[:4])
    build(read_source("folder", tmp_path / "src"), tmp_path / "out", OPTS)
    split = tmp_path / "out" / "train"
    assert cli(["shards", "verify", str(tmp_path / "out"), "--quiet"]) == 0
    index = json.loads((split / "index.json").read_text())
    shard = split / index["shards"][0]["name"]
    members = []
    with tarfile.open(shard) as tar:
        for m in tar:
            members.append((m, tar.extractfile(m).read()))
    with tarfile.open(shard, "w") as tar:
        for n, (m, data) in enumerate(members):
            if m.name.endswith(".jpg") and n < 3:
                data = data[: len(data) // 3]  # truncated JPEG
            m.size = len(data)
            import io

            tar.addfile(m, io.BytesIO(data))
    assert cli(["shards", "verify", str(tmp_path / "out"), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "sha256 does not match" in out and "does not decode" in out and shard.name in out


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(SourceError, match="images.txt"):
        read_source("cub", tmp_path)
    with pytest.raises(SourceError, match="unknown source kind"):
        read_source("coco", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no class folders"):
        read_source("folder", tmp_path / "empty")
    assert cli(["shards", "verify", str(tmp_path)]) == 2


def test_build_options_are_validated():
    with pytest.raises(ValueError, match="max-side"):
        BuildOptions(max_side=2)
    with pytest.raises(ValueError, match="chunk"):
        BuildOptions(chunk_size=0)
    assert os.cpu_count()
