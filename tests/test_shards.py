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


def _cli_build(*args):
    return cli(["shards", "build", *map(str, args), "--quiet", "--shard-size", "20k"])


def test_imagenet_splits_are_carved_by_class_and_per_class(tmp_path, images):
    fixtures.make_imagenet(tmp_path / "src", images)  # 12 classes x 6 images, train/ only
    wnids = [f"n{10000000 + 17 * c:08d}" for c in range(12)]
    (tmp_path / "held.txt").write_text(f"{wnids[5]}\n{wnids[2]}\n")
    cases = {"fraction": "0.25", "file": str(tmp_path / "held.txt"), "names": f"{wnids[8]},{wnids[7]}"}
    for name, holdout in cases.items():
        out = tmp_path / name
        assert (
            _cli_build(
                "--source", "imagenet", tmp_path / "src", out, "--val-per-class", 2, "--holdout-classes", holdout
            )
            == 0
        )
        train, val, held = (json.loads((out / s / "index.json").read_text()) for s in ("train", "val", "holdout"))
        n_held = len(held["classes"])
        assert n_held == (3 if name == "fraction" else 2) and not set(held["classes"]) & set(train["classes"])
        assert held["class_counts"] == [6] * n_held  # every image of a held-out class
        assert val["classes"] == train["classes"] and len(train["classes"]) == 12 - n_held
        assert val["class_counts"] == [2] * len(val["classes"]) and train["class_counts"] == [4] * len(train["classes"])
        assert train["carving"] == val["carving"] == held["carving"]
        assert train["carving"]["val_per_class"] == 2 and train["carving"]["holdout_classes"] == n_held
        sources = [set(sources_of(out / s)) for s in ("train", "val", "holdout")]
        assert sum(len(s) for s in sources) == 72 and not (sources[0] & sources[1] or sources[0] & sources[2])
    classes = {name: json.loads((tmp_path / name / "holdout" / "index.json").read_text())["classes"] for name in cases}
    assert classes["file"] == [wnids[2], wnids[5]] and classes["names"] == [wnids[7], wnids[8]]
    _cli_build(
        "--source", "imagenet", tmp_path / "src", tmp_path / "again", "--val-per-class", 2, "--holdout-classes", "0.25"
    )
    again = json.loads((tmp_path / "again" / "holdout" / "index.json").read_text())["classes"]
    assert again == classes["fraction"]  # seeded: the same carve
    assert set(sources_of(tmp_path / "again" / "val")) == set(sources_of(tmp_path / "fraction" / "val"))


def test_carving_refuses_what_makes_no_sense(tmp_path, images, capsys):
    fixtures.make_imagenet(tmp_path / "src", images[:4])
    assert _cli_build("--source", "imagenet", tmp_path / "src", tmp_path / "o1", "--holdout-classes", "nope,n99") == 2
    assert "does not have: nope, n99" in capsys.readouterr().err
    assert _cli_build("--source", "imagenet", tmp_path / "src", tmp_path / "o2", "--holdout-classes", "0.05") == 2
    assert "holds out 0" in capsys.readouterr().err
    fixtures.make_folder(tmp_path / "src" / "val", images[:4], [f"n{10000000 + 17 * c:08d}" for c in range(4)])
    assert _cli_build("--source", "imagenet", tmp_path / "src", tmp_path / "o3", "--val-per-class", 1) == 2
    assert "already has a val split" in capsys.readouterr().err


def test_small_classes_keep_training_images_when_val_is_carved(tmp_path, images):
    from distpddm.data.sources import carve

    fixtures.make_folder(tmp_path / "src", [images[0][:1], images[1][:3], images[2][:6]])
    plan = carve(read_source("folder", tmp_path / "src"), val_per_class=5, seed=0)
    assert plan.splits["val"].class_counts() == [0, 1, 3] and plan.splits["train"].class_counts() == [1, 2, 3]


def test_a_corrupt_source_file_is_named_or_skipped_and_listed(tmp_path, images, capsys):
    fixtures.make_folder(tmp_path / "src", images)
    bad = tmp_path / "src" / "class_003" / "002.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated, as some ImageNet files are
    assert _cli_build("--source", "folder", tmp_path / "src", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "--skip-bad" in err and "Traceback" not in err
    finished = list((tmp_path / "out" / "train").glob("shard-*.tar"))
    assert finished  # the shards written before it are kept (a rerun does not redo them)

    assert _cli_build("--source", "folder", tmp_path / "src", tmp_path / "out", "--skip-bad") == 0
    out = capsys.readouterr().out
    assert "1 source file(s) left out" in out and "class_003/002.jpg" in out
    index = json.loads((tmp_path / "out" / "train" / "index.json").read_text())
    assert [b["source"] for b in index["bad_files"]] == ["class_003/002.jpg"]
    assert index["samples"] == 71 and index["class_counts"][3] == 5
    assert "class_003/002.jpg" not in sources_of(tmp_path / "out" / "train")
    assert cli(["shards", "verify", str(tmp_path / "out"), "--quiet"]) == 0

    for name in ("000.jpg", "001.jpg"):
        (tmp_path / "src" / "class_005" / name).write_bytes(b"not an image")
    assert _cli_build("--source", "folder", tmp_path / "src", tmp_path / "o2", "--skip-bad", "--max-bad", 2) == 2
    assert "3 source files of split 'train' do not read or decode, more than --max-bad allows (2 of 72)" in (
        capsys.readouterr().err
    )


def test_a_rerun_reuses_the_source_listing(tmp_path, images, monkeypatch):
    from distpddm.data import sources

    fixtures.make_imagenet(tmp_path / "src", images[:5])
    assert _cli_build("--source", "imagenet", tmp_path / "src", tmp_path / "out") == 0
    assert (tmp_path / "out" / "plan.npz").exists()
    first = json.loads((tmp_path / "out" / "train" / "index.json").read_text())

    def no_scan(*a, **k):
        raise AssertionError("the source was listed again")

    monkeypatch.setattr(sources, "read_source", no_scan)
    assert _cli_build("--source", "imagenet", tmp_path / "src", tmp_path / "out", "--val-per-class", 1) == 0
    train = json.loads((tmp_path / "out" / "train" / "index.json").read_text())
    assert train["samples"] == first["samples"] - 5  # carved from the reused listing
    with pytest.raises(AssertionError, match="listed again"):
        _cli_build("--source", "imagenet", tmp_path / "src", tmp_path / "out", "--rescan")


def test_listing_records_every_image_and_its_size(tmp_path, images):
    from distpddm.data.sources import folder_split, load_plan, save_plan

    truth = fixtures.make_folder(tmp_path / "src", images, ext=".png")
    (tmp_path / "src" / "class_000" / "notes.txt").write_text("not an image")
    split = folder_split(tmp_path / "src")
    assert sorted(split.sources) == sorted(truth) and split.sources == sorted(split.sources)
    assert split.sizes.tolist() == [(tmp_path / "src" / s).stat().st_size for s in split.sources]
    assert [split.classes[label] for label in split.labels] == [truth[s] for s in split.sources]
    plan = read_source("folder", tmp_path / "src")
    save_plan(plan, tmp_path / "plan.npz", {"k": 1})
    back = load_plan(tmp_path / "plan.npz", {"k": 1}, tmp_path / "src")
    assert back.splits["train"].sources == split.sources and back.splits["train"].classes == split.classes
    assert (back.splits["train"].labels == split.labels).all() and (back.splits["train"].sizes == split.sizes).all()
    assert load_plan(tmp_path / "plan.npz", {"k": 2}, tmp_path / "src") is None  # made for another source


def test_a_shard_writer_receives_only_its_own_samples(tmp_path):
    import pickle

    import numpy as np

    from distpddm.data.shards import shard_tasks
    from distpddm.data.sources import SourcePlan, SplitPlan

    def task_bytes(n_images):
        split = SplitPlan([f"c{c}" for c in range(100)], [f"c{n % 100}/{n}.jpg" for n in range(n_images)],
                          np.arange(n_images) % 100, np.full(n_images, 1000))  # fmt: skip
        plan = SourcePlan("folder", tmp_path, {"train": split})
        tasks = list(shard_tasks(plan, "train", tmp_path, BuildOptions(shard_bytes=100_000, progress=False)))
        return len(tasks), max(len(pickle.dumps(t)) for t in tasks)

    small, large = task_bytes(1_000), task_bytes(100_000)
    assert large[0] >= 95 * small[0]  # about 100 x the shards, each of the same size
    assert large[1] < 1.2 * small[1]  # and what crosses to a worker does not grow with the plan


def test_shard_indexes_give_every_samples_offset_and_label(tmp_path, images):
    import tarfile

    from distpddm.data.tarindex import load_shard_index, parse_sample

    fixtures.make_folder(tmp_path / "src", images)
    index = build(read_source("folder", tmp_path / "src"), tmp_path / "out", OPTS)["train"]
    split = tmp_path / "out" / "train"
    for shard in index["shards"]:
        idx = load_shard_index(str(split / shard["name"].replace(".tar", ".idx.npz")))
        data = (split / shard["name"]).read_bytes()
        assert len(idx) == shard["samples"] and idx.offsets[-1] <= len(data)
        for n in range(len(idx)):
            sample = parse_sample(data[idx.offsets[n] : idx.offsets[n + 1]])
            assert int(sample["cls"]) == idx.labels[n] and sample["__key__"] == f"s{shard['first_index'] + n:010d}"
    victim = split / index["shards"][0]["name"].replace(".tar", ".idx.npz")
    victim.unlink()
    assert cli(["shards", "verify", str(tmp_path / "out"), "--quiet"]) == 1
    build(read_source("folder", tmp_path / "src"), tmp_path / "out", OPTS)  # a rerun writes it again
    assert cli(["shards", "verify", str(tmp_path / "out"), "--quiet"]) == 0
    with tarfile.open(split / index["shards"][0]["name"]) as tar:
        assert len(tar.getmembers()) == 3 * index["shards"][0]["samples"]


def test_a_damaged_shard_index_is_reported_and_rewritten_by_a_rerun(tmp_path, images):
    import numpy as np

    from distpddm.data.tarindex import load_shard_index, save_index

    fixtures.make_folder(tmp_path / "src", images)
    plan = read_source("folder", tmp_path / "src")
    index = build(plan, tmp_path / "out", OPTS)["train"]
    split = tmp_path / "out" / "train"
    first, second = (split / s["name"].replace(".tar", ".idx.npz") for s in index["shards"][:2])
    first.write_bytes(first.read_bytes()[:100])  # truncated
    stale = load_shard_index(str(second))
    save_index(type(stale)(stale.offsets, stale.labels + 1), second)  # well-formed, but not the tar's
    with pytest.raises(ValueError, match="unreadable shard index"):
        load_shard_index(str(first))
    assert cli(["shards", "verify", str(tmp_path / "out"), "--quiet"]) == 1
    build(plan, tmp_path / "out", OPTS)  # the rerun checks each finished shard's index against its tar
    assert cli(["shards", "verify", str(tmp_path / "out"), "--quiet"]) == 0
    assert np.array_equal(load_shard_index(str(second)).labels, stale.labels)


def test_file_names_need_not_be_utf8_and_a_damaged_listing_is_made_again(tmp_path, images):
    fixtures.make_folder(tmp_path / "src", images[:4])
    odd = os.fsencode(tmp_path / "src" / "class_000") + b"/caf\xe9.jpg"  # Latin-1, not UTF-8
    os.rename(os.fsencode(tmp_path / "src" / "class_000" / "000.jpg"), odd)
    assert _cli_build("--source", "folder", tmp_path / "src", tmp_path / "out") == 0
    assert any(s.endswith("caf\udce9.jpg") for s in sources_of(tmp_path / "out" / "train"))
    (tmp_path / "out" / "plan.npz").write_bytes(b"PK\x03\x04 damaged")
    assert _cli_build("--source", "folder", tmp_path / "src", tmp_path / "out") == 0  # listed again, no traceback
    assert cli(["shards", "verify", str(tmp_path / "out"), "--quiet"]) == 0


def test_held_out_classes_leave_a_val_split_that_lists_its_classes_on_its_own(tmp_path, images):
    from distpddm.data.sources import carve

    fixtures.make_folder(tmp_path / "src" / "train", images[:5])
    fixtures.make_folder(
        tmp_path / "src" / "val",
        [images[c][:2] for c in (0, 1, 3, 4)],
        ["class_000", "class_001", "class_003", "class_004"],
    )
    plan = carve(read_source("folder", tmp_path / "src"), holdout=["class_001", "class_002"], seed=0)
    val, held = plan.splits["val"], plan.splits["holdout"]
    assert val.classes == ["class_000", "class_003", "class_004"] and val.class_counts() == [2, 2, 2]
    assert held.classes == ["class_001", "class_002"] and held.class_counts() == [6 + 2, 6]
    assert all(s.split("/")[1] == held.classes[label] for s, label in zip(held.sources, held.labels, strict=True))


def test_build_runs_from_a_plain_script(tmp_path, images):
    # Worker processes must not need the caller's script to be import-safe (no `if __name__ == "__main__"`).
    import subprocess
    import sys

    fixtures.make_folder(tmp_path / "src", images[:6])
    script = tmp_path / "make_shards.py"
    script.write_text(
        "from distpddm.data.shards import BuildOptions, build\n"
        "from distpddm.data.sources import read_source\n"
        f"index = build(read_source('folder', {str(tmp_path / 'src')!r}), {str(tmp_path / 'out')!r},\n"
        "              BuildOptions(shard_bytes=20_000, progress=False, workers=2))\n"
        "print(index['train']['samples'], len(index['train']['shards']))\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    samples, shards = map(int, result.stdout.split())
    assert samples == 36 and shards > 2  # several shards: the pool ran


def test_every_shard_and_index_is_fsynced_before_it_is_named(tmp_path, images, monkeypatch):
    # A power loss must not leave an index.json naming truncated shards: every file's bytes are on disk
    # before its rename, the renames are durable (folder fsynced), and index.json comes after every shard.
    fixtures.make_folder(tmp_path / "src", images)
    events = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        fsync(fd)

    def spy_replace(src, dst):
        events.append(("replace", os.path.realpath(src), os.path.realpath(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    one_process = BuildOptions(shard_bytes=20_000, progress=False, workers=1)  # the spies see every write
    index = build(read_source("folder", tmp_path / "src"), tmp_path / "out", one_process)["train"]
    split = os.path.realpath(tmp_path / "out" / "train")
    assert len(index["shards"]) > 1

    def committed(name: str) -> int:
        """Where ``name`` was renamed into place, after checking its fsync before and the folder's after."""
        final = os.path.join(split, name)
        (at,) = [n for n, e in enumerate(events) if e[0] == "replace" and e[2] == final]
        assert ("fsync", events[at][1]) in events[:at], f"{name} was not fsynced before its rename"
        assert ("fsync", split) in events[at + 1 :], f"the folder was not fsynced after {name}'s rename"
        return at

    shards = [committed(s["name"]) for s in index["shards"]]
    shards += [committed(s["name"].replace(".tar", ".idx.npz")) for s in index["shards"]]
    shards += [committed(s["name"].replace(".tar", ".json")) for s in index["shards"]]
    assert committed("index.json") > max(shards)


def _with_members(shard: Path, extra: list[tarfile.TarInfo]) -> None:
    """Rewrite a shard with ``extra`` (non-file) members after its first sample's."""
    import io

    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w") as tar:
        for n, (m, data) in enumerate(members):
            tar.addfile(m, io.BytesIO(data))
            if n == 2:
                for info in extra:
                    tar.addfile(info)


def test_verify_names_members_that_are_not_files(tmp_path, images, capsys):
    fixtures.make_folder(tmp_path / "src", images[:4])
    build(read_source("folder", tmp_path / "src"), tmp_path / "out", OPTS)
    split = tmp_path / "out" / "train"
    shard = split / json.loads((split / "index.json").read_text())["shards"][0]["name"]
    folder = tarfile.TarInfo("extra")
    folder.type = tarfile.DIRTYPE
    link = tarfile.TarInfo("s9999999999.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "elsewhere.jpg"
    hard = tarfile.TarInfo("s9999999999.cls")
    hard.type, hard.linkname = tarfile.LNKTYPE, "nowhere.cls"
    _with_members(shard, [folder, link, hard])
    assert cli(["shards", "verify", str(tmp_path / "out"), "--quiet"]) == 1  # a finding, not a crash (rc 1)
    out = capsys.readouterr().out
    for name in ("extra", "s9999999999.jpg", "s9999999999.cls"):
        assert f"{shard.name}: member {name} is not a file" in out
    assert "unreadable tar" not in out and "samples, index says" not in out  # the samples themselves still count


def test_an_interrupted_rebuild_is_refused_until_it_finishes(tmp_path, images, monkeypatch, capsys):
    from distpddm.data import shards
    from distpddm.data.stream import PKBatchDataset, resolve_shards

    fixtures.make_folder(tmp_path / "src", images)
    plan = read_source("folder", tmp_path / "src")
    first = build(plan, tmp_path / "out", BuildOptions(shard_bytes=20_000, progress=False, workers=1))["train"]
    split = tmp_path / "out" / "train"
    assert len(first["shards"]) >= 3 and cli(["shards", "verify", str(tmp_path / "out"), "--quiet"]) == 0
    capsys.readouterr()

    # A rebuild with other options (another chunk order: every shard changes) dies at its third shard.
    written, write_shard = [], shards.write_shard

    def dies_at_the_third(task, reader=None):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(task.shard)
        return write_shard(task, reader)

    monkeypatch.setattr(shards, "write_shard", dies_at_the_third)
    other = BuildOptions(shard_bytes=20_000, progress=False, workers=1, seed=1)
    with pytest.raises(KeyboardInterrupt):
        build(plan, tmp_path / "out", other)
    assert written == [0, 1]  # two new shards beside the old build's others
    assert (split / "shard-000002.tar").exists()

    with pytest.raises(FileNotFoundError, match="build of this split was interrupted.*rerun `distpddm shards build`"):
        resolve_shards(split)  # what the trainer and evaluation read the split through
    with pytest.raises(FileNotFoundError, match="interrupted"):
        PKBatchDataset(split, 4, 2)
    assert cli(["shards", "verify", str(tmp_path / "out"), "--quiet"]) == 1
    assert "build of this split was interrupted" in capsys.readouterr().out
    assert cli(["shards", "verify", str(split), "--quiet"]) == 1  # the split folder itself, too

    monkeypatch.setattr(shards, "write_shard", write_shard)
    again = build(plan, tmp_path / "out", other)["train"]  # finished: readable again, as the new build
    assert resolve_shards(split).counts == [s["samples"] for s in again["shards"]]
    assert again["seed"] == 1 and not (split / shards.INCOMPLETE).exists()
    assert cli(["shards", "verify", str(tmp_path / "out"), "--quiet"]) == 0
