"""The judging half of ``bench/gpu_check.sh``: reads what its runs left and prints each check's figures as JSON.

Subcommands (each prints one JSON object; ``--out`` also writes it; exit 1 when the check fails):

* ``decoder``: can the training stream's image decoder (TorchCodec) decode a PNG here?
* ``shards SPLIT --classes N --per-class K``: does the split have N classes of at least K images?
* ``search --shim DIR``: can validation's nearest-neighbour search (``faiss.knn``) run here? If not, a
  stand-in package in DIR does it in numpy (exact, ties in gallery order, as faiss), and the JSON says so.
* ``smoke RUN --device D --shards SPLIT``: the run learned, judged as ``distpddm smoke`` judges it
  (:func:`distpddm.smoke.judge_recall`): held-out Recall@1 (the trainer's validation on ``data.val_shards``)
  rose from step 0, the untrained network, to the last step; and ``RUN/model.pt`` loads with
  :func:`distpddm.model.load_exported`, has fp32 weights and embeds a batch of the split's images on ``D`` into
  unit vectors. The loss (first logged values against the last) is reported, not judged: with hard mining it
  need not fall while the embedding improves.
* ``split RUN --warmup W``: images/s and the step-time split (``time_*`` of ``metrics.jsonl``), averaged
  over the logged steps after step W, in ms and as shares of the step.
* ``mining RAW``: the figures of ``bench/mining.py --out RAW``.
* ``report WORK --mode M --out OUT``: the checks' JSON files and exit statuses in WORK, in one object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARTS = ("time_data", "time_forward", "time_comm", "time_mining_loss", "time_backward_step")
#: What each part of a step is called in the JSON (time_comm is the gather of the embeddings).
PART_NAMES = {
    "time_data": "data",
    "time_forward": "forward",
    "time_comm": "gather",
    "time_mining_loss": "mining_loss",
    "time_backward_step": "backward_step",
}
CHECKS = ("smoke", "throughput", "mining", "parity")


def _emit(result: dict, out: str | None) -> int:
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return 0 if result.get("passed") else 1


def _metrics(run: Path, key: str) -> list[dict]:
    """The lines of ``RUN/metrics.jsonl`` with ``key``, one per step (a checkpoint step may repeat the last)."""
    rows = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if key in row and "step" in row:
                rows.setdefault(int(row["step"]), row)
    return [rows[s] for s in sorted(rows)]


def _run_config(run: Path) -> dict:
    import yaml

    path = run / "config.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else {}


SHIM = '''"""Stand-in written by bench/gpu_check.py: TorchCodec does not work on this machine (%s).
decode_image raises RuntimeError, so distpddm.data.images.decode_tensor decodes with PIL instead."""


def decode_image(*args, **kwargs):
    raise RuntimeError("torchcodec stand-in: decode with PIL")
'''


def cmd_decoder(args) -> int:
    """TorchCodec decodes a PNG here, or (``--shim DIR``) a stand-in package in DIR makes the stream use PIL."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.arange(48 * 32, dtype=np.uint8).reshape(32, 48)).convert("RGB").save(buf, format="PNG")
    result = {"check": "decoder"}
    try:
        import torchcodec
        from torchcodec.decoders import decode_image

        shape = tuple(decode_image(buf.getvalue(), mode="RGB").shape)
        if shape != (3, 32, 48):
            raise ValueError(f"decoded shape {shape}, expected (3, 32, 48)")
        result.update(image_decoder=f"torchcodec {getattr(torchcodec, '__version__', '?')}", passed=True)
    except Exception as e:  # noqa: BLE001 -- any failure means the stream cannot use it here
        error = f"{type(e).__name__}: {e}"[:300]
        result.update(image_decoder=None, passed=False, error=error)
        if args.shim:
            pkg = Path(args.shim) / "torchcodec"
            pkg.mkdir(parents=True, exist_ok=True)
            (pkg / "__init__.py").write_text('__version__ = "stand-in"\n')
            (pkg / "decoders.py").write_text(SHIM % error.replace('"', "'").replace("\\", "/"))
            result.update(image_decoder=f"PIL (torchcodec unusable here: {error})", shim=str(pkg), passed=True)
    return _emit(result, args.out)


def cmd_shards(args) -> int:
    index = json.loads((Path(args.split) / "index.json").read_text())
    counts = index.get("class_counts") or []
    enough = sum(c >= args.per_class for c in counts)
    result = {
        "check": "shards",
        "path": str(Path(args.split).resolve()),
        "samples": index.get("samples"),
        "classes": len(index.get("classes", [])),
        "classes_with_enough_images": enough,
        "needed": f"{args.classes} classes of >= {args.per_class} images",
        "bytes": sum(s.get("bytes", 0) for s in index.get("shards", [])),
        "passed": enough >= args.classes,
    }
    return _emit(result, args.out)


def _first_images(split: Path, size: int, count: int) -> list:
    """The first ``count`` images of the split's first shard, through the evaluation transform (uint8)."""
    import tarfile

    from distpddm.data.images import IMAGE_EXTENSIONS
    from distpddm.data.transforms import eval_transform

    index = json.loads((split / "index.json").read_text())
    transform = eval_transform(size)
    out = []
    with tarfile.open(split / index["shards"][0]["name"]) as tar:
        for member in tar:
            if member.isfile() and member.name.rpartition(".")[2].lower() in IMAGE_EXTENSIONS:
                out.append(transform(tar.extractfile(member).read()))
                if len(out) == count:
                    break
    if not out:
        raise ValueError(f"no image in {split / index['shards'][0]['name']}")
    return out


FAISS_SHIM = '''"""Stand-in written by bench/gpu_check.py: faiss does not work on this machine (%s).
Only what validation calls: exact k nearest neighbours by squared L2, ties in gallery order (as faiss), in numpy;
the whole query x gallery block at once, which suits the smoke's few hundred held-out images."""

import numpy as np

__version__ = "numpy stand-in"


def knn(xq, xb, k, metric=None):
    xq, xb = np.asarray(xq, dtype=np.float32), np.asarray(xb, dtype=np.float32)
    d = (xq * xq).sum(1)[:, None] + (xb * xb).sum(1)[None, :] - 2 * (xq @ xb.T)
    np.maximum(d, 0, out=d)
    rows = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, rows, 1), rows.astype(np.int64)
'''


def cmd_search(args) -> int:
    """faiss's exact search works here, or (``--shim DIR``) a numpy stand-in in DIR serves validation's calls."""
    import numpy as np

    result = {"check": "search"}
    try:
        import faiss

        x = np.arange(12, dtype=np.float32).reshape(4, 3)
        _, rows = faiss.knn(x, x, 2)
        if rows[:, 0].tolist() != [0, 1, 2, 3]:
            raise ValueError(f"faiss.knn found {rows.tolist()}")
        result.update(nearest_neighbours=f"faiss {getattr(faiss, '__version__', '?')}", passed=True)
    except Exception as e:  # noqa: BLE001 -- any failure means validation cannot use it here
        error = f"{type(e).__name__}: {e}"[:300]
        result.update(nearest_neighbours=None, passed=False, error=error)
        if args.shim:
            pkg = Path(args.shim) / "faiss"
            pkg.mkdir(parents=True, exist_ok=True)
            (pkg / "__init__.py").write_text(FAISS_SHIM % error.replace('"', "'").replace("\\", "/"))
            result.update(nearest_neighbours=f"numpy stand-in (faiss unusable here: {error})", shim=str(pkg))
            result["passed"] = True
    return _emit(result, args.out)


def cmd_smoke(args) -> int:
    import torch

    from distpddm.data.transforms import normalize_batch
    from distpddm.model import load_exported
    from distpddm.smoke import judge_recall

    run = Path(args.run)
    rows = _metrics(run, "loss")
    losses = [float(r["loss"]) for r in rows]
    n = max(1, min(5, len(losses) // 3))
    first = sum(losses[:n]) / n if losses else math.nan
    last = sum(losses[-n:]) / n if losses else math.nan
    fell = bool(losses) and len(losses) >= 2 and all(math.isfinite(x) for x in losses) and last < first
    result = {
        "check": "smoke",
        "device": args.device,
        "run": str(run),
        "steps": int(rows[-1]["step"]) if rows else 0,
        "logged_steps": len(rows),
        "precision": _run_config(run).get("train", {}).get("precision"),
        "loss_first": [round(x, 4) for x in losses[:n]],
        "loss_last": [round(x, 4) for x in losses[-n:]],
        "loss_first_mean": first,
        "loss_last_mean": last,
        "loss_fell": fell,
        "loss_judged": False,  # information: with hard mining the loss need not fall while the embedding improves
        "val_shards": _run_config(run).get("data", {}).get("val_shards"),
    }
    every = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    held_out = judge_recall(every)
    result |= held_out or {"learned": False, "error": "no held-out Recall@1 at step 0 and at a later step"}
    export = {}
    try:
        blob = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
        floats = {k: v.dtype for k, v in blob["state_dict"].items() if v.is_floating_point()}
        export["weights_fp32"] = bool(floats) and all(d == torch.float32 for d in floats.values())
        model = load_exported(run / "model.pt", map_location=args.device).to(args.device)
        export["params_on_device"] = all(p.device.type == torch.device(args.device).type for p in model.parameters())
        size = _run_config(run).get("data", {}).get("image_size") or args.image_size
        images = _first_images(Path(args.shards), size, args.batch)
        x = torch.stack(images)
        with torch.no_grad():
            emb = model(normalize_batch(x.to(args.device)))
            ref = load_exported(run / "model.pt")(normalize_batch(x))  # the same weights on the CPU
        norms = emb.float().norm(dim=1)
        export.update(
            batch=list(x.shape),
            embedding_shape=list(emb.shape),
            embedding_device=str(emb.device),
            embedding_dtype=str(emb.dtype).replace("torch.", ""),
            embed_dim=blob["model"].get("embed_dim"),
            max_norm_error=float((norms - 1).abs().max()),
            finite=bool(torch.isfinite(emb).all()),
            cpu_max_abs_diff=float((emb.float().cpu() - ref).abs().max()),
        )
        export["ok"] = (
            export["weights_fp32"]
            and export["params_on_device"]
            and export["finite"]
            and export["embedding_dtype"] == "float32"
            and export["max_norm_error"] < 1e-3
            and emb.device.type == torch.device(args.device).type
            and emb.shape == (len(images), blob["model"]["embed_dim"])
        )
    except Exception as e:  # noqa: BLE001 -- reported in the JSON
        export.update(ok=False, error=f"{type(e).__name__}: {e}"[:1000])
    result["export"] = export
    result["passed"] = bool(result["learned"] and export.get("ok"))
    return _emit(result, args.out)


def cmd_split(args) -> int:
    run = Path(args.run)
    rows = _metrics(run, "time_step")
    used = [r for r in rows if int(r["step"]) > args.warmup]
    cfg = _run_config(run)
    data, model, train = cfg.get("data", {}), cfg.get("model", {}), cfg.get("train", {})
    result = {
        "check": "throughput",
        "run": str(run),
        "backbone": model.get("backbone"),
        "image_size": data.get("image_size"),
        "embed_dim": model.get("embed_dim"),
        "batch": f"{data.get('classes_per_batch')} x {data.get('images_per_class')}",
        "images_per_step": (data.get("classes_per_batch") or 0) * (data.get("images_per_class") or 0),
        "precision": train.get("precision"),
        "loader_workers": data.get("loader_workers"),
        "steps": int(rows[-1]["step"]) if rows else 0,
        "warmup_steps": args.warmup,
        "averaged_steps": [int(r["step"]) for r in used],
    }
    if not used:
        result.update(passed=False, error=f"no logged step after step {args.warmup}")
        return _emit(result, args.out)
    mean = {k: sum(float(r[k]) for r in used) / len(used) for k in (*PARTS, "time_step", "images_per_s")}
    step = mean["time_step"]
    split = {PART_NAMES[k]: {"ms": round(1e3 * mean[k], 3), "share": round(mean[k] / step, 4)} for k in PARTS}
    share_sum = sum(mean[k] for k in PARTS) / step
    result.update(
        images_per_s=mean["images_per_s"],
        images_per_s_from_mean_step=result["images_per_step"] / step if result["images_per_step"] else None,
        step_ms=1e3 * step,
        split=split,
        share_sum=share_sum,
        passed=mean["images_per_s"] > 0 and abs(share_sum - 1) < 0.01 and all(mean[k] >= 0 for k in PARTS),
    )
    return _emit(result, args.out)


def cmd_mining(args) -> int:
    raw = json.loads(Path(args.raw).read_text())
    resnet = raw["resnet50"]["seconds"]
    rows = []
    ok = resnet > 0
    for r in raw["rows"]:
        row = {"dim": r["dim"], "pool": r["pool"], "world": r["world"]}
        for case in ("local", "dense", "pml", "functional", "cand"):
            if case in r:
                secs = r[case]["seconds"]
                ok &= math.isfinite(secs) and secs > 0
                row[f"{case}_ms"] = 1e3 * secs
                row[f"{case}_peak_mib"] = r[case]["peak_mib"]
        row["local_us_per_anchor"] = row["local_ms"] * 1e3 / 64
        row["local_pct_of_resnet50"] = 100 * row["local_ms"] / (1e3 * resnet)
        if "cand" in r:
            row["cand_exact_negative"] = r["cand"]["exact_negative"]
            row["cand_exact_quadruplet"] = r["cand"]["exact_quadruplet"]
        rows.append(row)
    result = {
        "check": "mining",
        "device": raw.get("device"),
        "command": args.command_line,
        "anchors": 64,
        "resnet50_ms": 1e3 * resnet,
        "resnet50_peak_mib": raw["resnet50"]["peak_mib"],
        "resnet50_step": args.resnet,
        "rows": rows,
        "passed": bool(ok and rows and (args.pool is None or any(r["pool"] == args.pool for r in rows))),
    }
    return _emit(result, args.out)


def _device_name(mode: str) -> str:
    import torch

    if mode == "gpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _tail(path: Path, lines: int = 25) -> list[str]:
    return path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []


def cmd_report(args) -> int:
    import torch

    work = Path(args.work)

    def status(step: str) -> dict:
        path = work / f"{step}.status"
        if not path.exists():
            return {"ran": False}
        rc, secs = path.read_text().split()[:2]
        return {"ran": True, "exit": int(rc), "seconds": int(secs), "timed_out": int(rc) in (124, 137)}

    def load(name: str) -> dict | None:
        path = work / f"{name}.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    checks = {}
    for name in CHECKS:
        steps = {s: status(s) for s in (f"{name}_run", name) if (work / f"{s}.status").exists() or s == name}
        figures = load(name)
        entry = dict(figures) if figures else {"check": name}
        entry.pop("check", None)
        failed_steps = [s for s, st in steps.items() if not st["ran"] or st["exit"] != 0]
        entry["passed"] = bool(figures and figures.get("passed") and not failed_steps)
        entry["seconds"] = sum(st.get("seconds", 0) for st in steps.values())
        if failed_steps:
            entry["failed_steps"] = {s: steps[s] for s in failed_steps}
            skip = work / f"{name}.skipped"
            if skip.exists():
                entry["skipped"] = skip.read_text().strip()
            entry["log_tail"] = {s: _tail(work / f"{s}.log") for s in failed_steps if (work / f"{s}.log").exists()}
        checks[name] = entry

    decoder, search = load("decoder") or {}, load("search") or {}
    shards = load("shards") or {}
    result = {
        "mode": args.mode,
        "device": "cuda" if args.mode == "gpu" else "cpu",
        "device_name": _device_name(args.mode),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "deepspeed": _version("deepspeed"),
        "image_decoder": decoder.get("image_decoder"),
        "nearest_neighbours": search.get("nearest_neighbours"),
        "shards": {k: shards.get(k) for k in ("path", "classes", "samples", "bytes", "passed")},
        "seconds": args.seconds,
        "checks": checks,
        "passed": all(c["passed"] for c in checks.values()),
        "failed": [n for n, c in checks.items() if not c["passed"]],
    }
    return _emit(result, args.out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("decoder")
    d.add_argument("--shim", help="where TorchCodec fails: write a stand-in package here (the stream then uses PIL)")
    d.set_defaults(func=cmd_decoder)

    s = sub.add_parser("shards")
    s.add_argument("split")
    s.add_argument("--classes", type=int, required=True)
    s.add_argument("--per-class", type=int, default=4)
    s.set_defaults(func=cmd_shards)

    f = sub.add_parser("search")
    f.add_argument("--shim", help="where faiss fails: write a numpy stand-in package here (validation then uses it)")
    f.set_defaults(func=cmd_search)

    m = sub.add_parser("smoke")
    m.add_argument("run")
    m.add_argument("--device", required=True)
    m.add_argument("--shards", required=True, help="a split folder whose images the exported model embeds")
    m.add_argument("--image-size", type=int, default=32)
    m.add_argument("--batch", type=int, default=64)
    m.set_defaults(func=cmd_smoke)

    t = sub.add_parser("split")
    t.add_argument("run")
    t.add_argument("--warmup", type=int, default=0, help="average the logged steps after this one")
    t.set_defaults(func=cmd_split)

    g = sub.add_parser("mining")
    g.add_argument("raw")
    g.add_argument("--pool", type=int, help="the pool that must be in the results")
    g.add_argument("--resnet", default="batch 64, 224 px", help="what the ResNet-50 reference step was")
    g.add_argument("--command-line", default=None)
    g.set_defaults(func=cmd_mining)

    r = sub.add_parser("report")
    r.add_argument("work")
    r.add_argument("--mode", required=True, choices=("gpu", "cpu-reduced"))
    r.add_argument("--seconds", type=int, default=None, help="the whole run's wall-clock seconds")
    r.set_defaults(func=cmd_report)

    for sp in (d, f, s, m, t, g, r):
        sp.add_argument("--out", help="also write the JSON here")
    args = p.parse_args()
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
