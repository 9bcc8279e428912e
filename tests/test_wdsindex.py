"""Indexing published (timm-layout) WebDataset shards in place: against a plain tarfile read, locally, over
HTTP from a real nginx (and over S3 from moto's server, where s3fs and moto are installed), with damaged tars
and samples, resumes, class subsets and carving."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distpddm.cli import main as cli
from distpddm.data import retry, wdsindex
from distpddm.data.sources import SourcePlan, SplitPlan, carve
from distpddm.data.wdsindex import (
    DamagedShardError,
    IndexOptions,
    RangeReader,
    TooManyBadError,
    carve_rows,
    expand_braces,
    index_shards,
    select_classes,
    walk_tar,
)
from tests import fixtures

N_CLASSES = 6
PER_SHARD = 18
WNIDS = [f"n{1440764 + 97 * c:08d}" for c in range(N_CLASSES)]


def noise_image(rng: np.random.Generator, fmt: str, side: int = 224) -> bytes:
    """Noise compresses badly: images of tens of KiB, as in the real releases, from a small picture."""
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format=fmt, quality=90)
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes | None]], fmt: int = tarfile.PAX_FORMAT) -> None:
    """``(name, bytes)`` in order; ``None`` bytes: a folder entry."""
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def timm_shard(path: Path, first: int, rng, image: str = "jpg", order=("img", "cls", "json"), **faults) -> None:
    """A shard laid out as timm's releases are: ``<key>.jpg|webp``, ``<key>.cls``, ``<key>.json``; keys in
    class folders and with dots (``n.../n..._7.v2``), some longer than ustar's 100-character name field."""
    members: list[tuple[str, bytes | None]] = []
    folders = set()
    for n in range(first, first + PER_SHARD):
        label = int(rng.integers(N_CLASSES))
        wnid = WNIDS[label]
        key = f"{wnid}/{wnid}_{n}.v2" if n % 3 else f"{wnid}_{n}"
        if n % 7 == 5:  # PAX: a path record; GNU: a long-name member; ustar: the prefix field
            key = f"{wnid}/" + "long" * (22 if faults.get("fmt") == tarfile.USTAR_FORMAT else 30) + f"_{n}"
        if "/" in key and wnid not in folders:
            folders.add(wnid)
            members.append((f"{wnid}/", None))
        meta = {"label": label, "class_name": wnid, "filename": f"{wnid}_{n}.JPEG", "width": 224, "height": 224}
        fields = {
            "img": (f"{key}.{image}", noise_image(rng, "WEBP" if image == "webp" else "JPEG")),
            "cls": (f"{key}.cls", str(label).encode()),
            "json": (f"{key}.json", json.dumps(meta).encode()),
        }
        if n == faults.get("no_cls"):
            del fields["cls"]
        if faults.get("fmt") == tarfile.USTAR_FORMAT:  # as timm writes it: the class only in the file name
            del meta["class_name"]
            fields["json"] = (f"{key}.json", json.dumps(meta).encode())
        if n == faults.get("bad_json"):
            fields["json"] = (f"{key}.json", b'{"label": 3, "class_na')
        members += [fields[f] for f in order if f in fields]
    write_tar(path, members, faults.get("fmt", tarfile.PAX_FORMAT))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Four shards: JPEG (PAX), WEBP (GNU, sorted members, one sample without cls), JPEG (ustar) with a json
    that does not decode, and a copy of the first cut in the middle of an image."""
    src = tmp_path_factory.mktemp("wds")
    rng = np.random.default_rng(0)
    timm_shard(src / "in12k-train-0000.tar", 0, rng)
    timm_shard(
        src / "in12k-train-0001.tar", 100, rng, "webp", ("cls", "json", "img"), no_cls=104, fmt=tarfile.GNU_FORMAT
    )
    timm_shard(src / "in12k-train-0002.tar", 200, rng, bad_json=207, fmt=tarfile.USTAR_FORMAT)
    data = (src / "in12k-train-0000.tar").read_bytes()
    (src / "in12k-train-0003.tar").write_bytes(data[: len(data) // 2 + 300])
    return src


PATTERN = "in12k-train-{0000..0003}.tar"
#: The source holds one damaged shard and two bad samples: let them through.
LENIENT = {"progress": False, "max_bad_shards": 1, "max_bad": 2}


def tarfile_truth(path: Path) -> tuple[list[dict], list[str]]:
    """What a plain tarfile read finds: the good samples (key, first header, end, label, image bytes' place)
    and the keys of the bad ones (no cls, or a json that does not decode)."""
    good, bad = [], []
    with tarfile.open(path) as tar:
        groups: list[tuple[str, list[tarfile.TarInfo]]] = []
        for m in tar:
            if not m.isfile():
                continue
            key = m.name.rpartition(".")[0]
            if not groups or groups[-1][0] != key:
                groups.append((key, []))
            groups[-1][1].append(m)
        for key, members in groups:
            by_ext = {m.name.rpartition(".")[2]: m for m in members}
            try:
                label = int(tar.extractfile(by_ext["cls"]).read())
                json.loads(tar.extractfile(by_ext["json"]).read())
            except (KeyError, ValueError):
                bad.append(key)
                continue
            image = by_ext.get("jpg") or by_ext["webp"]
            last = members[-1]
            good.append(
                {
                    "key": key,
                    "start": members[0].offset,
                    "end": last.offset_data + -(-last.size // 512) * 512,
                    "label": label,
                    "image": (image.offset_data, image.size),
                }
            )
    return good, bad


def load_npz(path: Path) -> dict:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def assert_matches_tarfile(shard_index: dict, tar: Path) -> None:
    good, bad = tarfile_truth(tar)
    meta = json.loads(str(shard_index["meta"]))
    assert shard_index["keys"].tolist() == [g["key"] for g in good]
    assert shard_index["offsets"][:-1].tolist() == [g["start"] for g in good]
    assert shard_index["ends"].tolist() == [g["end"] for g in good]
    assert shard_index["labels"].tolist() == [g["label"] for g in good]
    places = zip(shard_index["image_offsets"].tolist(), shard_index["image_sizes"].tolist(), strict=True)
    assert list(places) == [g["image"] for g in good]
    assert [b["key"] for b in meta["bad_samples"]] == bad


def test_index_equals_a_tarfile_read(source, tmp_path, capsys):
    out = tmp_path / "idx"
    argv = ["shards", "index", str(source / PATTERN), str(out), "--quiet", "--workers", "3"]
    assert cli([*argv, "--max-bad-shards", "1", "--max-bad", "2"]) == 0
    printed = capsys.readouterr().out
    assert "in12k-train-0003.tar" in printed and "truncated" in printed and "2 bad samples" in printed
    for n in range(3):
        tar = source / f"in12k-train-000{n}.tar"
        assert_matches_tarfile(load_npz(out / "shard-index" / f"in12k-train-000{n}.idx.npz"), tar)
    assert not (out / "shard-index" / "in12k-train-0003.idx.npz").exists()
    bad = json.loads(str(load_npz(out / "shard-index" / "in12k-train-0001.idx.npz")["meta"]))["bad_samples"]
    assert bad[0]["error"] == "no cls member" and "_104" in bad[0]["key"]

    index = json.loads((out / "train" / "index.json").read_text())
    assert index["layout"] == "foreign" and index["source"].endswith(PATTERN) and index["samples"] == 3 * 18 - 2
    present = sorted({g["label"] for n in range(3) for g in tarfile_truth(source / f"in12k-train-000{n}.tar")[0]})
    assert index["classes"] == [WNIDS[c] for c in present] and index["source_labels"] == present
    named = wdsindex.index_shard(str(source / "in12k-train-0002.tar")).class_names  # json: only a file name
    assert named and all(WNIDS[label] == name for label, name in named.items())
    # From OUT alone: every selected sample's image bytes, read at the recorded place, are the tar's.
    selection = load_npz(out / "train" / index["selection"])
    seen = 0
    for s, shard in enumerate(index["shards"]):
        arrays = load_npz((out / "train" / shard["index"]).resolve())
        rows = selection["row"][selection["shard"] == s]
        assert len(rows) == shard["samples"]
        with tarfile.open(shard["url"]) as tar, open(shard["url"], "rb") as raw:
            members = {m.name: m for m in tar if m.isfile()}
            for row in rows.tolist():
                key, ext = arrays["keys"][row], arrays["image_exts"][row]
                raw.seek(int(arrays["image_offsets"][row]))
                assert raw.read(int(arrays["image_sizes"][row])) == tar.extractfile(members[f"{key}.{ext}"]).read()
                seen += 1
    labels = selection["label"]
    assert seen == index["samples"] and np.bincount(labels).tolist() == index["class_counts"]


def test_damaged_tars_are_refused(source, tmp_path):
    # A plain read does not notice the cut until it reads the member that was cut.
    with tarfile.open(source / "in12k-train-0003.tar") as tar, pytest.raises(tarfile.ReadError):
        for m in tar:
            if m.isfile():
                tar.extractfile(m).read()
    data = bytearray((source / "in12k-train-0000.tar").read_bytes())
    second = wdsindex.index_shard(str(source / "in12k-train-0000.tar")).starts[1]
    data[second + 10] ^= 0xFF  # a header whose checksum no longer fits
    with pytest.raises(DamagedShardError, match=f"unreadable tar header at byte {second}"):
        list(walk_tar(lambda p, n: bytes(data[p : p + n]), len(data)))
    with pytest.raises(DamagedShardError, match="without the end-of-archive"):
        end = second  # cut exactly at a header: nothing runs past the end, but the end marker is missing
        list(walk_tar(lambda p, n: bytes(data[:end][p : p + n]), end))

    with pytest.raises(TooManyBadError, match="in12k-train-0003.tar"):
        index_shards(str(source / PATTERN), tmp_path / "a", IndexOptions(progress=False, max_bad=5))
    assert len(list((tmp_path / "a" / "shard-index").glob("*.npz"))) == 3  # kept for the rerun
    with pytest.raises(TooManyBadError, match=r"2 samples are bad.*_104.v2 \(no cls member\)"):
        index_shards(str(source / PATTERN), tmp_path / "a", IndexOptions(progress=False, max_bad_shards=1, max_bad=1))


def test_training_reads_an_indexed_split_and_verify_refuses_it_with_one_line(source, tmp_path, capsys):
    # Training reads it by class-aware range reads (tests/test_foreign_stream.py runs `distpddm train` on one);
    # verify checks what `shards build` writes.
    from distpddm.data.foreign import ForeignPKDataset
    from distpddm.data.stream import PKBatchDataset, resolve_shards

    out = tmp_path / "idx"
    index_shards(str(source / PATTERN), out, IndexOptions(**LENIENT))
    for spec in (out / "train", out / "train" / "index.json"):
        assert resolve_shards(spec).foreign
    with pytest.raises(ValueError, match="ForeignPKDataset"):
        PKBatchDataset(out / "train", 2, 2, image_size=16)
    batch = next(iter(ForeignPKDataset(out / "train", 2, 2, image_size=16)))
    assert batch.images.shape == (4, 3, 16, 16) and len(set(batch.labels.tolist())) == 2
    capsys.readouterr()
    for where in (out, out / "train"):  # OUT (its splits found under it) or the split itself
        assert cli(["shards", "verify", str(where), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {out / 'train'}: a pre-shuffled split indexed in place (`distpddm shards")
        assert err.count("\n") == 1 and "Traceback" not in err


def test_rerun_skips_indexed_shards(source, tmp_path, monkeypatch):
    out = tmp_path / "idx"
    options = IndexOptions(**LENIENT)
    first = index_shards(str(source / PATTERN), out, options)
    assert (first.indexed, first.skipped, len(first.bad_shards)) == (3, 0, 1)
    torn = out / "shard-index" / "in12k-train-0002.idx.npz"
    torn.write_bytes(torn.read_bytes()[:100])  # not an atomic write's: a file that does not load whole
    calls = []
    real = wdsindex.index_shard
    monkeypatch.setattr(wdsindex, "index_shard", lambda url, window: calls.append(url) or real(url, window))
    again = index_shards(str(source / PATTERN), out, options)
    assert sorted(Path(u).name for u in calls) == ["in12k-train-0002.tar", "in12k-train-0003.tar"]
    assert (again.indexed, again.skipped, again.samples) == (1, 2, first.samples)
    assert again.splits["train"]["selection"] == first.splits["train"]["selection"]


def test_subset_and_carving_on_the_index(source, tmp_path, monkeypatch):
    out = tmp_path / "idx"
    base = IndexOptions(**LENIENT)
    index_shards(str(source / PATTERN), out, base)
    indexed = wdsindex.index_shard

    def only_the_bad_one(url, window):  # everything below works on the index: no good shard is read again
        assert url.endswith("0003.tar"), url
        return indexed(url, window)

    monkeypatch.setattr(wdsindex, "index_shard", only_the_bad_one)
    whole = json.loads((out / "train" / "index.json").read_text())
    counts = dict(zip(whole["classes"], whole["class_counts"], strict=True))
    subset = [c for c in whole["classes"] if counts[c] >= 4][:4]
    (tmp_path / "subset.txt").write_text("\n".join(f"{c} some words" for c in subset) + "\n")
    options = IndexOptions(
        **LENIENT,
        classes=tmp_path / "subset.txt",
        min_per_class=1,
        val_per_class=1,
        holdout=[subset[0]],
        seed=3,
    )
    splits = index_shards(str(source / PATTERN), out, options).splits
    assert set(splits) == {"train", "val", "holdout"}
    assert splits["holdout"]["classes"] == [subset[0]] and splits["train"]["classes"] == subset[1:]
    assert splits["val"]["class_counts"] == [1] * 3 and splits["holdout"]["samples"] == counts[subset[0]]
    assert sum(s["samples"] for s in splits.values()) == sum(counts[c] for c in subset)
    places = []
    for name, index in splits.items():
        sel = load_npz(out / name / index["selection"])
        places += [(index["shards"][s]["name"], r) for s, r in zip(sel["shard"], sel["row"], strict=True)]
    assert len(places) == len(set(places))  # no sample in two splits
    with pytest.raises(ValueError, match="not in the shards: n99"):
        (tmp_path / "unknown.txt").write_text("n99\n")
        index_shards(
            str(source / PATTERN),
            out,
            IndexOptions(**LENIENT, classes=tmp_path / "unknown.txt"),
        )
    index_shards(str(source / PATTERN), out, base)  # without carving: the carved splits go
    assert not (out / "val" / "index.json").exists() and not (out / "holdout" / "index.json").exists()


def test_carving_matches_the_builders():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 40, 900)
    classes = [f"c{n:02d}" for n in range(40)]
    plan = SourcePlan("folder", Path("."), {"train": SplitPlan(classes, [str(n) for n in range(900)], labels)})
    for val, holdout in ((3, 0.25), (2, None), (None, ["c05", "c07"]), (5, ["c01"])):
        built = carve(plan, val, holdout, seed=7)
        ours, carving = carve_rows(select_classes(labels, classes), val, holdout, seed=7)
        assert carving == built.carving and set(ours) == set(built.splits)
        for name, split in built.splits.items():
            assert ours[name].rows.tolist() == sorted(int(s) for s in split.sources)
            order = np.argsort([int(s) for s in split.sources])
            assert ours[name].labels.tolist() == split.labels[order].tolist() and ours[name].classes == split.classes
    few = select_classes(labels, classes, min_per_class=int(np.bincount(labels).max()))
    assert len(few.classes) == 1 and few.labels.tolist() == [0] * len(few.rows)


def test_class_names_file(source, tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("".join(f"syn{n} extra words\n" for n in range(N_CLASSES)))
    out = index_shards(
        str(source / PATTERN),
        tmp_path / "o",
        IndexOptions(**LENIENT, class_names=names),
    )
    assert all(c.startswith("syn") for c in out.splits["train"]["classes"])
    names.write_text("just-one\n")
    with pytest.raises(ValueError, match="names 1 classes, but label"):
        index_shards(
            str(source / PATTERN),
            tmp_path / "o",
            IndexOptions(**LENIENT, class_names=names),
        )


def test_webp_decodes_like_jpeg():
    from distpddm.data.images import decode_image, decode_tensor

    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="WEBP", lossless=True)
    assert np.array_equal(np.asarray(decode_image(buf.getvalue())), pixels)
    tensor = decode_tensor(buf.getvalue())
    assert tuple(tensor.shape) == (3, 24, 40) and np.array_equal(tensor.permute(1, 2, 0).numpy(), pixels)


def test_expand_braces():
    assert expand_braces("s-{0008..0011}.tar") == [f"s-{n:04d}.tar" for n in range(8, 12)]
    assert expand_braces("{a,b}/x-{1..2}") == ["a/x-1", "a/x-2", "b/x-1", "b/x-2"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_transient_errors_are_retried_persistent_ones_not(source, monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(retry, "_sleep", sleeps.append)
    real = RangeReader._fetch
    failures = iter([ConnectionResetError("reset by peer"), TimeoutError("read timed out")])

    def flaky(self, pos, n):
        error = next(failures, None)
        if error is not None:
            raise error
        return real(self, pos, n)

    monkeypatch.setattr(RangeReader, "_fetch", flaky)
    url = str(source / "in12k-train-0000.tar")
    got = wdsindex.index_shard(url)
    assert sleeps == [retry.RETRY_BASE_S, 2 * retry.RETRY_BASE_S]
    monkeypatch.setattr(RangeReader, "_fetch", real)
    assert got.keys == wdsindex.index_shard(url).keys
    with pytest.raises(FileNotFoundError):
        wdsindex.index_shard(str(source / "missing.tar"))
    assert len(sleeps) == 2


# ------------------------------------------------------------------------------------------ over HTTP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


APT = "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light"  # = `make nginx`


def _find_nginx() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


def nginx_binary() -> str:
    """Debian's nginx; installed with apt-get (as `make nginx` does) when missing and run as root."""
    found = _find_nginx()
    if found:
        return found
    if os.geteuid() != 0:
        pytest.skip(f"nginx is not installed and installing it needs root: run `make nginx` ({APT})")
    try:
        r = subprocess.run(["bash", "-c", APT], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"could not install nginx ({APT}): {e}")
    found = _find_nginx()
    if r.returncode != 0 or not found:
        pytest.skip(f"could not install nginx ({APT}): exit {r.returncode}: {(r.stderr or r.stdout)[-600:]}")
    return found


@pytest.fixture
def nginx(source, tmp_path):
    """Debian's nginx as this user's process, serving the source on a free port: ``/`` with ranges,
    ``/noranges/`` without (``max_ranges 0``), ``/mixed/`` with but for one shard, and one shard that always
    answers 503."""
    binary = nginx_binary()
    port = _free_port()
    run = tmp_path / "nginx"
    run.mkdir()
    user = "user root;" if os.geteuid() == 0 else ""  # workers as root can read pytest's 0700 temp folders
    (run / "nginx.conf").write_text(f"""
{user}
worker_processes 1;
pid {run}/nginx.pid;
error_log {run}/error.log;
events {{ worker_connections 64; }}
http {{
    log_format sent '$request_method $uri $status $bytes_sent';
    access_log {run}/access.log sent;
    client_body_temp_path {run}/body; proxy_temp_path {run}/proxy; fastcgi_temp_path {run}/fastcgi;
    uwsgi_temp_path {run}/uwsgi; scgi_temp_path {run}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {source};
        location = /in12k-train-0009.tar {{ return 503; }}
        location /noranges/ {{ alias {source}/; max_ranges 0; }}
        location = /mixed/in12k-train-0001.tar {{ alias {source}/in12k-train-0001.tar; max_ranges 0; }}
        location /mixed/ {{ alias {source}/; }}
    }}
}}
""")
    proc = subprocess.Popen([binary, "-c", str(run / "nginx.conf"), "-p", str(run), "-g", "daemon off;"])
    try:
        if not fixtures.wait_for_port(port, 5):
            pytest.fail(f"nginx did not start: {(run / 'error.log').read_text()}")
        yield f"http://127.0.0.1:{port}", run / "access.log"
    finally:
        proc.terminate()
        proc.wait(10)


def test_one_shard_that_ignores_ranges_in_a_folder_that_honours_them_is_refused_unread(source, nginx, monkeypatch):
    """Once a folder has answered a range with a range, its reads skip fsspec's per-file check; a shard there
    that answers 200 with the whole file is refused from the status line, its body never read."""
    import aiohttp

    from distpddm.data import ranges

    base, _ = nginx
    bodies, real = [], aiohttp.ClientResponse.read

    async def read(self):
        bodies.append(str(self.url))
        return await real(self)

    monkeypatch.setattr(aiohttp.ClientResponse, "read", read)
    good, bad = f"{base}/mixed/in12k-train-0000.tar", f"{base}/mixed/in12k-train-0001.tar"
    data = (source / "in12k-train-0000.tar").read_bytes()
    assert ranges.read_range(good, 512, 100) == data[512:612]
    assert f"{base}/mixed" in ranges._RANGES_HONOURED
    assert ranges.read_range(good, 1024, 100) == data[1024:1124] and bodies[-1] == good  # the honoured path
    with pytest.raises(ranges.RangesIgnored, match="ignores HTTP range requests"):
        ranges.read_range(bad, 512, 100)
    with pytest.raises(ranges.RangesIgnored, match="ignores HTTP range requests"):
        ranges.read_async(bad, 512, 100, threading.Event()).result(10)
    assert bad not in bodies


def sent_bytes(log: Path) -> tuple[int, int]:
    lines = [line.split() for line in log.read_text().splitlines()]
    return len(lines), sum(int(f[3]) for f in lines)


def test_index_over_http_equals_local_and_skips_image_bytes(source, tmp_path, nginx, monkeypatch):
    monkeypatch.setattr(retry, "_sleep", lambda s: None)
    base, log = nginx
    options = IndexOptions(**LENIENT, workers=2)
    local = index_shards(str(source / PATTERN), tmp_path / "local", options)
    remote = index_shards(f"{base}/{PATTERN}", tmp_path / "http", options)
    for n in range(3):
        a = load_npz(tmp_path / "local" / "shard-index" / f"in12k-train-000{n}.idx.npz")
        b = load_npz(tmp_path / "http" / "shard-index" / f"in12k-train-000{n}.idx.npz")
        for k in a.keys() - {"meta"}:
            assert np.array_equal(a[k], b[k]), k
        ma, mb = json.loads(str(a["meta"])), json.loads(str(b["meta"]))
        assert ma["bad_samples"] == [s | {"url": ma["url"]} for s in mb["bad_samples"]]
    assert [b["url"].rsplit("/", 1)[-1] for b in remote.bad_shards] == ["in12k-train-0003.tar"]
    assert remote.splits["train"]["classes"] == local.splits["train"]["classes"]
    assert remote.splits["train"]["class_counts"] == local.splits["train"]["class_counts"]
    assert remote.splits["train"]["shards"][0]["url"] == f"{base}/in12k-train-0000.tar"

    requests, sent = sent_bytes(log)
    image_bytes = 0
    for n in range(3):
        with tarfile.open(source / f"in12k-train-000{n}.tar") as tar:
            image_bytes += sum(m.size for m in tar if m.name.endswith((".jpg", ".webp")))
    shard_bytes = sum((source / f"in12k-train-000{n}.tar").stat().st_size for n in range(4))
    print(
        f"\nHTTP index: {requests} requests, {sent} bytes sent for {shard_bytes} bytes of shards "
        f"({image_bytes} of images in the whole shards): {sent / shard_bytes:.1%}"
    )
    assert sent < 0.15 * image_bytes

    # A server that ignores ranges: read as one stream each, the same index.
    streamed = index_shards(f"{base}/noranges/{PATTERN}", tmp_path / "stream", options)
    assert streamed.splits["train"]["class_counts"] == local.splits["train"]["class_counts"]
    a = load_npz(tmp_path / "local" / "shard-index" / "in12k-train-0001.idx.npz")
    b = load_npz(tmp_path / "stream" / "shard-index" / "in12k-train-0001.idx.npz")
    assert all(np.array_equal(a[k], b[k]) for k in a.keys() - {"meta"})

    # A shard that answers 503 every time: retried, then named, not counted as bad data.
    with pytest.raises(TooManyBadError, match=r"in12k-train-0009.tar \(.*503"):
        index_shards(f"{base}/in12k-train-{{0000,0009}}.tar", tmp_path / "503", IndexOptions(progress=False))
    assert sent_bytes(log)[0] > requests
    assert any(" /in12k-train-0009.tar 503" in line for line in log.read_text().splitlines())


# --------------------------------------------------------------------------------------------- over S3


def _forget_filesystems(s3fs) -> None:
    """The S3 filesystems s3fs and the readers (ranges.url_to_fs, per URL) keep for the process's life."""
    from distpddm.data import ranges

    s3fs.S3FileSystem.clear_instance_cache()
    ranges._FILESYSTEMS.clear()
    ranges._SHARED.clear()


@pytest.fixture
def s3(monkeypatch):
    """moto's S3 server, a process of its own on a free port (s3fs's own test suite runs against it), with a
    bucket ``shards``; credentials and endpoint in the environment, as a user's would be. Yields s3fs."""
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[dev]')")
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[dev]')")
    import s3fs

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        if not fixtures.wait_for_port(port, 20):
            pytest.fail("moto's S3 server did not start")
        for key, value in {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }.items():
            monkeypatch.setenv(key, value)
        _forget_filesystems(s3fs)  # another test's, bound to its own (gone) server's port
        fs = s3fs.S3FileSystem()
        fs.mkdir("shards")
        yield fs
    finally:
        _forget_filesystems(s3fs)
        server.terminate()
        server.wait(10)


def test_index_over_s3_equals_local(source, tmp_path, s3):
    """Through s3fs: the same code path as HTTP, ranged GETs with fsspec's cache off."""
    for path in sorted(source.glob("*.tar")):
        s3.put(str(path), f"shards/{path.name}")
    options = IndexOptions(**LENIENT, workers=2)
    local = index_shards(str(source / PATTERN), tmp_path / "local", options)
    remote = index_shards(f"s3://shards/{PATTERN}", tmp_path / "s3", options)
    for n in range(3):
        a = load_npz(tmp_path / "local" / "shard-index" / f"in12k-train-000{n}.idx.npz")
        b = load_npz(tmp_path / "s3" / "shard-index" / f"in12k-train-000{n}.idx.npz")
        assert all(np.array_equal(a[k], b[k]) for k in a.keys() - {"meta"})
    assert remote.splits["train"]["class_counts"] == local.splits["train"]["class_counts"]
    assert [b["url"] for b in remote.bad_shards] == ["s3://shards/in12k-train-0003.tar"]
    assert remote.bytes_read < 0.15 * remote.shard_bytes  # counted by the reader: moto logs no bytes
    shards = json.loads((tmp_path / "s3" / "train" / "index.json").read_text())["shards"]
    assert all(s["etag"] for s in shards)  # S3's version tags, checked when the split is opened


def test_a_range_past_the_end_of_an_s3_object_is_not_retried(source, s3, monkeypatch):
    """S3 answers 416 (s3fs: an OSError with errno EINVAL): a request error, raised at once, not a store's
    failure to wait out with five retries."""
    from distpddm.data import ranges

    waits = []
    monkeypatch.setattr(retry, "_sleep", waits.append)
    path = sorted(source.glob("*.tar"))[0]
    s3.put(str(path), f"shards/{path.name}")
    url, size = f"s3://shards/{path.name}", path.stat().st_size
    assert ranges.read_range(url, size - 10, 10) == path.read_bytes()[-10:]
    with pytest.raises(OSError) as raised:
        ranges.read_range(url, size + 1024, 10)
    assert raised.value.errno == errno.EINVAL and waits == []


def test_no_secret_is_printed_or_logged(source, tmp_path, s3, monkeypatch, capsys, caplog):
    """`distpddm shards index` over S3 with the secret key in the environment, and over HTTP with a password
    in the URL, through retries (503s) and a damaged shard, both named in what it prints and logs: the
    secret appears nowhere, the URL with its password hidden does."""
    import s3fs

    secret = "Zq8-Ae3-not-a-real-secret"
    monkeypatch.setattr(retry, "_sleep", lambda s: None)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    _forget_filesystems(s3fs)  # a filesystem of the fixture's holds the old key
    for path in sorted(source.glob("in12k-train-000[0-3].tar")):
        s3.put(str(path), f"shards/{path.name}")
    with fixtures.http_store(source) as store, caplog.at_level(logging.DEBUG):
        store.answer = lambda method, name, nth: 503 if name.endswith("0001.tar") and nth <= 2 else None
        base = store.base.replace("http://", f"http://ann:{secret}@")
        for src, out in ((f"s3://shards/{PATTERN}", "s3"), (f"{base}/{PATTERN}", "http")):
            assert cli(["shards", "index", src, str(tmp_path / out), "--max-bad-shards", "1", "--max-bad", "2"]) == 0
    printed = "".join(capsys.readouterr()) + caplog.text
    assert secret not in printed
    assert f"shard {store.base.replace('http://', 'http://ann:***@')}/in12k-train-0003.tar" in printed
    assert "shard s3://shards/in12k-train-0003.tar" in printed and "retry 1 of" in printed
