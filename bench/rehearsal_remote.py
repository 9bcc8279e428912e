"""The rehearsal of training on published shards (issue 24): an imitation of timm's ``imagenet-12k-wds`` served
over HTTP from a host 25 ms away, indexed in place, trained on with 2 Ray workers, evaluated on held-out classes.

1. **data**: ``bench/rehearsal.py``'s long-tailed glyph photographs (12,000 classes, 5 to ~150 images, with its
   grayscale, CMYK, PNG-behind-JPEG and truncated files), written as timm's releases are laid out:
   pre-shuffled over the shards, ``<key>.jpg`` or ``<key>.webp`` (half each) + ``<key>.cls`` + ``<key>.json``;
   and a separate validation set (2 images of every class with at least 8). Made once and kept.
2. **hosts**: ``server`` (Debian's nginx behind ``bench/remote_stream.py``'s relay, 25 ms each way, 1 Gbit/s)
   and ``client`` (everything below), network namespaces (``tests/cluster.py``).
3. **index**: ``distpddm shards index`` on the server's train and validation URLs, in place, with a class
   subset (10,000 of the 12,000, as ImageNet-10K is of 21K), and 10% of them held out, chosen on the index.
4. **train**: ``distpddm train configs/rehearsal.yaml`` on the indexed split over HTTP, a local Ray cluster
   of 2 workers in the client host, validated on the held-out classes at step 0 and at the end.
5. **eval**: ``distpddm eval --local`` of the exported model on the held-out classes, over HTTP.

Each stage's wall time and the peak memory of its process tree (``bench/measure.py``) are printed, and written
with ``--out``. Needs root (namespaces, tc) and nginx (installed with apt-get when missing)::

    sudo .venv/bin/python bench/rehearsal_remote.py [--classes 12000] [--steps 300] [--delay-ms 25]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
import rehearsal  # noqa: E402
import remote_stream  # noqa: E402
from measure import print_stages, run  # noqa: E402

PER_TAR = 8000  # samples per train tar (timm's hold ~12k)
VAL_PER_CLASS, VAL_MIN = 2, 8  # the separate validation set: 2 images of every class with at least 8
SUBSET = 10_000  # classes trained on, of --classes


def _member(path: str, webp: bool) -> tuple[str, bytes]:
    """A file's bytes as the release stores them: the JPEG as it is, or re-encoded to WEBP (lossy, q 90)."""
    data = Path(path).read_bytes()
    if not webp:
        return "jpg", data
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            out = io.BytesIO()
            img.convert("RGB").save(out, format="WEBP", quality=90)
            return "webp", out.getvalue()
    except Exception:  # noqa: BLE001 -- a truncated file stays as broken as it came, for the readers to skip
        return "webp", data


def _write_tar(job) -> int:
    from tests.test_wdsindex import write_tar

    path, files, labels = job
    members = []
    for f, label in zip(files, labels, strict=True):
        wnid, name = Path(f).parent.name, Path(f).name
        key = f"{wnid}/{Path(f).stem}"
        webp = hashlib.md5(name.encode()).digest()[0] % 2 == 1  # half WEBP, fixed per file
        ext, data = _member(f, webp)
        meta = {"label": int(label), "class_name": wnid, "filename": name, "width": 32, "height": 32}
        members += [
            (f"{key}.{ext}", data),
            (f"{key}.cls", str(label).encode()),
            (f"{key}.json", json.dumps(meta).encode()),
        ]
    write_tar(Path(path), members)
    return len(files)


def make_release(work: Path, classes: int) -> dict:
    """The imitation of imagenet-12k-wds under ``work/release``, kept between runs."""
    marker = work / "release" / "release.json"
    want = {"classes": classes, "version": 2}
    if marker.exists() and json.loads(marker.read_text()).items() >= want.items():
        return json.loads(marker.read_text()) | {"seconds": 0.0}
    start = time.perf_counter()
    rehearsal.make_tree(work / "tree", classes)
    out = work / "release"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    wnids = sorted(p.name for p in (work / "tree" / "train").iterdir())
    train, val = [], []
    for label, wnid in enumerate(wnids):
        files = sorted(str(p) for p in (work / "tree" / "train" / wnid).iterdir())
        cut = VAL_PER_CLASS if len(files) >= VAL_MIN else 0
        val += [(f, label) for f in files[:cut]]
        train += [(f, label) for f in files[cut:]]
    rng = np.random.default_rng(12)
    jobs = []
    for name, samples, per in (("train", train, PER_TAR), ("val", val, PER_TAR)):
        order = rng.permutation(len(samples))  # pre-shuffled: a tar holds a few images of thousands of classes
        for s in range(-(-len(samples) // per)):
            chunk = [samples[i] for i in order[s * per : (s + 1) * per].tolist()]
            jobs.append(
                (str(out / f"imagenet12k-{name}-{s:04d}.tar"), [f for f, _ in chunk], [lab for _, lab in chunk])
            )
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        written = sum(pool.map(_write_tar, jobs))
    info = want | {
        "train_samples": len(train),
        "val_samples": len(val),
        "train_tars": sum("-train-" in j[0] for j in jobs),
        "val_tars": sum("-val-" in j[0] for j in jobs),
        "bytes": sum(Path(j[0]).stat().st_size for j in jobs),
        "written": written,
    }
    (out / "classes.txt").write_text("\n".join(wnids) + "\n")
    subset = sorted(np.random.default_rng(10).choice(wnids, min(SUBSET, len(wnids)), replace=False).tolist())
    (out / "subset.txt").write_text("\n".join(subset) + "\n")
    in_val = {wnids[label] for _, label in val}  # the validation set lacks the classes of under VAL_MIN images
    (out / "subset-val.txt").write_text("\n".join(c for c in subset if c in in_val) + "\n")
    marker.write_text(json.dumps(info))
    return info | {"seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=12_000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--delay-ms", type=float, default=25, help="each way, between the client and the server")
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--work", type=Path, default=Path("/tmp/distpddm-rehearsal-remote"))
    p.add_argument("--out", type=Path, help="write the stage table as JSON here")
    args = p.parse_args()
    from tests.cluster import Cluster

    nginx = remote_stream.require_host_tools()
    stages = []
    print(f"== data: an imitation of imagenet-12k-wds, {args.classes} classes, under {args.work / 'release'}")
    release = make_release(args.work, args.classes)
    print(json.dumps(release))
    stages.append({"stage": "data (synthetic release)", "seconds": round(release["seconds"], 1),
                   "note": f"{release['train_samples']} train samples in {release['train_tars']} tars, "
                           f"{release['val_samples']} val in {release['val_tars']}, "
                           f"{release['bytes'] / 2**20:.0f} MiB, "
                           "half JPEG, half WEBP" + ("" if release["seconds"] else " (kept)")})  # fmt: skip

    with Cluster(("client", "server")) as cluster:
        ip = cluster.ip["server"]
        run_dir = args.work / "nginx"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir()
        conf = remote_stream.nginx_conf(run_dir, args.work)
        cluster.popen("server", [nginx, "-c", str(conf), "-p", str(run_dir), "-g", "daemon off;"])
        remote_stream.set_rate(cluster, args.rate)
        relay = remote_stream.start_relay(cluster, ip, args.delay_ms)
        base = f"http://{ip}:{remote_stream.PORT}"
        (args.work / "data.json").write_text("{}")  # the relay's round-trip probe asks for it
        for _ in range(100):
            with contextlib.suppress(RuntimeError):
                rtt = remote_stream.round_trip_ms(cluster, base)
                break
            time.sleep(0.1)
        else:
            raise SystemExit(f"nginx or the relay did not start: {(run_dir / 'error.log').read_text()}")
        print(f"\nthe release at {base}/release/, a GET takes {rtt:.1f} ms from the client")
        env = cluster.ray_env()
        cli = [sys.executable, "-m", "distpddm.cli"]
        release_dir = args.work / "release"

        index = args.work / "index"
        shutil.rmtree(index, ignore_errors=True)
        print(f"\n== index: in place over HTTP; {min(SUBSET, args.classes)} classes, 10% of them held out")
        train_urls = f"{base}/release/imagenet12k-train-{{0000..{release['train_tars'] - 1:04d}}}.tar"
        val_urls = f"{base}/release/imagenet12k-val-{{0000..{release['val_tars'] - 1:04d}}}.tar"
        common = ["--window", "64k", "--workers", "32", "--quiet"]
        indexed = run(cluster.wrap("client", [*cli, "shards", "index", train_urls, str(index / "train-release"),
                                              "--classes", str(release_dir / "subset.txt"), "--holdout-classes",
                                              "0.1", *common]), env=env, cwd=REPO)  # fmt: skip
        if indexed.returncode:
            raise SystemExit("indexing the train tars failed")
        indexed_val = run(cluster.wrap("client", [*cli, "shards", "index", val_urls, str(index / "val-release"),
                                                  "--classes", str(release_dir / "subset-val.txt"), "--split", "val",
                                                  *common]), env=env, cwd=REPO)  # fmt: skip
        if indexed_val.returncode:
            raise SystemExit("indexing the validation tars failed")
        splits = {}
        for folder in ("train-release", "val-release"):
            for split_index in sorted((index / folder).glob("*/index.json")):
                i = json.loads(split_index.read_text())
                splits[f"{folder}/{split_index.parent.name}"] = f"{i['samples']} / {len(i['classes'])} classes"
        both = indexed.row()
        both["seconds"] = round(both["seconds"] + indexed_val.row()["seconds"], 1)
        both["peak_mib"] = max(both.get("peak_mib") or 0, indexed_val.row().get("peak_mib") or 0)
        stages.append({"stage": "index (train + val tars, over HTTP)", **both,
                       "note": "; ".join(f"{k}: {v}" for k, v in splits.items())})  # fmt: skip

        runs = args.work / "runs"
        shutil.rmtree(runs, ignore_errors=True)
        print("\n== train: 2 Ray workers over HTTP, validation on the held-out classes at step 0 and at the end")
        overrides = [
            f"data.train_shards={index / 'train-release' / 'train'}",
            f"data.val_shards={index / 'train-release' / 'holdout'}",
            f"ray.storage_path={runs}",
            f"train.steps={args.steps}",
            "train.progress=false",
            "data.val_max_images=10000",
        ]
        train = run(cluster.wrap("client", [*cli, "train", "configs/rehearsal.yaml", *overrides]), env=env, cwd=REPO)
        if train.returncode:
            raise SystemExit("training failed")
        metrics = [json.loads(line) for line in (runs / "rehearsal" / "metrics.jsonl").read_text().splitlines()]
        last = next(m for m in reversed(metrics) if "loss" in m)
        before = next(m for m in metrics if m["step"] == 0 and "val_recall@1" in m)
        after = next(m for m in reversed(metrics) if "val_recall@1" in m)
        note = (f"held-out R@1 {before['val_recall@1']:.3f} -> {after['val_recall@1']:.3f} "
                f"({int(after['val_images'])} images); {last['images_per_s']:.0f} images/s")  # fmt: skip
        stages.append({"stage": f"train ({args.steps} steps, 2 workers, over HTTP) + held-out validation",
                       **train.row(), "note": note})  # fmt: skip
        print(f"\ntraining's memory at its peak, MiB by process: {train.breakdown()}")

        print("\n== eval: `distpddm eval` of the exported model on the held-out classes, over HTTP")
        evaluated = run(cluster.wrap("client", [*cli, "eval", str(runs / "rehearsal"), "--shards",
                                                str(index / "train-release" / "holdout"), "--local", "--quiet",
                                                "--loader-workers", "1", "--max-images", "10000"]),
                        env=env, cwd=REPO)  # fmt: skip
        if evaluated.returncode:
            raise SystemExit("evaluation failed")
        found = sorted(runs.glob("rehearsal/eval-*/metrics.json"))
        result = json.loads(found[-1].read_text()) if found else {}
        stages.append({"stage": "eval (held-out classes, over HTTP)", **evaluated.row(),
                       "note": f"R@1 {result.get('recall@1', float('nan')):.3f}, MAP@R "
                               f"{result.get('map@r', float('nan')):.3f} ({result.get('images')} images)"})  # fmt: skip
        remote_stream.stop(relay)

    print_stages(stages)
    if args.out:
        args.out.write_text(json.dumps({"classes": args.classes, "release": release, "stages": stages}, indent=1))
    if after["val_recall@1"] <= before["val_recall@1"]:
        raise SystemExit("held-out Recall@1 did not rise above the untrained network's")


if __name__ == "__main__":
    main()
