"""Retrieval metrics at scale: distpddm.retrieval on one million 128-d embeddings in 10,000 classes, beside
pytorch-metric-learning's AccuracyCalculator at the largest size it completes here. Usage::

    python bench/eval_scale.py [--n 1000000] [--classes 10000] [--ladder 10000 30000 100000 300000 1000000]
                               [--cap-gib 8] [--timeout 14400] [--out docs/eval_scale.json]
    python bench/eval_scale.py --quick          # smoke run: 20k / 200 classes, ladder 5k and 10k

Data: synthetic clusters, class sizes drawn uniformly between 0.2x and 1.8x the mean (100 images per class
at every size), centres random unit vectors, each image its centre + Gaussian noise (sigma 0.15 per
coordinate), L2-normalised, rows in random order; seeded, so every run and both libraries see the same
embeddings. Every measurement runs in its own child process (peak memory = the child's ru_maxrss, its high-water
resident set; the parent also samples it and stops the child above --cap-gib, and the child's data segment is
limited to --cap-gib + 2 GiB so that one huge allocation fails at once instead of taking the machine down).

The same metrics on both sides: Recall@1 (PML's precision_at_1), R-Precision, MAP@R (PML with
``k="max_bin_count"``, its exact setting) and NMI (faiss k-means, 20 iterations, on both sides; PML's seed is
faiss's default 1234, ours 0); ours also computes Recall@2..32 from the same search.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIGMA = 0.15
PER_CLASS = 100
IMAGENET10K = {"images": 9_000_000, "classes": 10_000, "depth": 1000}  # neighbours: r_cap 1000 binds (~900 per class)


def make_data(n: int, classes: int, dim: int = 128, sigma: float = SIGMA, seed: int = 0):
    """(embeddings float32 n x dim, unit rows; labels int64): class centres + noise, sizes vary 0.2x-1.8x."""
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.2, 1.8, classes)
    sizes = np.maximum(2, np.floor(w / w.sum() * n).astype(np.int64))
    while sizes.sum() != n:  # fix the rounding, keeping every class at >= 2
        diff = n - int(sizes.sum())
        pick = rng.choice(np.flatnonzero(sizes > 2) if diff < 0 else np.arange(classes), abs(diff))
        np.add.at(sizes, pick, 1 if diff > 0 else -1)
        sizes = np.maximum(sizes, 2)
    labels = rng.permutation(np.repeat(np.arange(classes, dtype=np.int64), sizes))
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.empty((n, dim), np.float32)
    for s in range(0, n, 65536):
        e = min(n, s + 65536)
        x[s:e] = centres[labels[s:e]] + sigma * rng.standard_normal((e - s, dim), dtype=np.float32)
        x[s:e] /= np.linalg.norm(x[s:e], axis=1, keepdims=True)
    return x, labels


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------------------------------------ children


class _Timer:
    """Accumulated seconds of every call of a function (generators: the time spent inside next())."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, fn, generator: bool = False):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t

        def timed_gen(*a, **kw):
            it = fn(*a, **kw)
            while True:
                t = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    self.seconds += time.perf_counter() - t
                yield item

        return timed_gen if generator else timed


def child_ours(n: int, classes: int, depth_probe: bool) -> dict:
    import sklearn.metrics  # noqa: F401  (imported up front, as PML's module does, so NMI time is NMI's)

    from distpddm import retrieval as R

    t = time.perf_counter()
    x, y = make_data(n, classes)
    out = {"data_s": time.perf_counter() - t, "data_peak_mib": peak_mib()}
    search, recall, rmap = _Timer(), _Timer(), _Timer()
    R._search_blocks = search.wrap(R._search_blocks, generator=True)
    R._recall_hits = recall.wrap(R._recall_hits)
    R._r_sums = rmap.wrap(R._r_sums)
    t = time.perf_counter()
    metrics = R.retrieval_metrics(x, y)
    out["retrieval_s"] = time.perf_counter() - t
    out |= {"search_s": search.seconds, "recall_s": recall.seconds, "r_metrics_s": rmap.seconds}
    out["retrieval_peak_mib"] = peak_mib()
    counts = np.bincount(y)
    out["depth"] = int(min(n - 1, max(32, min(counts.max() - 1, R.DEFAULT_R_CAP))))
    t = time.perf_counter()
    metrics["nmi"] = R.clustering_nmi(x, y)
    out["nmi_s"] = time.perf_counter() - t
    out["metrics"] = metrics
    if depth_probe:  # paired: the same 8192 queries against the whole gallery at this depth and at 1001
        import faiss

        q = np.ascontiguousarray(x[:8192])
        for depth in (out["depth"] + 1, IMAGENET10K["depth"] + 1):
            t = time.perf_counter()
            faiss.knn(q, x, depth)
            out[f"probe_depth{depth}_s"] = time.perf_counter() - t
        out["probe_pairs"] = len(q) * n
    out["peak_mib"] = peak_mib()
    return out


def child_pml(n: int, classes: int) -> dict:
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import FaissKMeans, FaissKNN

    t = time.perf_counter()
    x, y = make_data(n, classes)
    out = {"data_s": time.perf_counter() - t, "data_peak_mib": peak_mib()}
    knn, kmeans = _Timer(), _Timer()
    calc = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r", "NMI"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=knn.wrap(FaissKNN()),
        kmeans_func=kmeans.wrap(FaissKMeans(niter=20)),
    )
    t = time.perf_counter()
    acc = calc.get_accuracy(x, y)
    out["total_s"] = time.perf_counter() - t
    out |= {"search_s": knn.seconds, "kmeans_s": kmeans.seconds}
    out["metrics"] = {
        "recall@1": acc["precision_at_1"],
        "r_precision": acc["r_precision"],
        "map@r": acc["mean_average_precision_at_r"],
        "nmi": acc["NMI"],
    }
    out["peak_mib"] = peak_mib()
    return out


# ------------------------------------------------------------------------------------------------ parent


def run_child(args: list[str], cap_gib: float, timeout: float) -> dict:
    """A child process with a memory cap and a timeout; its JSON result, or why it stopped."""
    cap = int(cap_gib * 2**30)

    def limit():
        resource.setrlimit(resource.RLIMIT_DATA, (cap + 2**31, cap + 2**31))

    cmd = [sys.executable, __file__, "--worker", *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    state = {"sampled_peak": 0, "why": None}

    def watch():
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                return
            state["sampled_peak"] = max(state["sampled_peak"], rss)
            if rss > cap:
                state["why"] = f"stopped above the {cap_gib:g} GiB cap"
                proc.kill()
                return
            if time.perf_counter() - start > timeout:
                state["why"] = f"stopped after the {timeout:.0f} s timeout"
                proc.kill()
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    watcher.join()
    seconds = time.perf_counter() - start
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode == 0 and lines:
        result = json.loads(lines[-1][len("RESULT ") :])
        result["ok"] = True
    else:
        tail = stderr.strip().splitlines()[-1:] or ["(no output)"]
        why = state["why"] or f"exit {proc.returncode}: {tail[0][:300]}"
        result = {"ok": False, "why": why}
    result["wall_s"] = seconds
    result["sampled_peak_mib"] = state["sampled_peak"] / 2**20
    return result


def fmt_s(s) -> str:
    return "-" if s is None else (f"{s:.1f}" if s < 100 else f"{s:,.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--classes", type=int, default=10_000)
    ap.add_argument("--ladder", type=int, nargs="*", default=[10_000, 30_000, 100_000, 300_000, 1_000_000])
    ap.add_argument("--cap-gib", type=float, default=8.0)
    ap.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per child")
    ap.add_argument("--quick", action="store_true", help="smoke run: --n 20000 --classes 200 --ladder 5000 10000")
    ap.add_argument("--skip-main", action="store_true", help="only the ladder")
    ap.add_argument("--merge", action="store_true", help="add to the --out file's record (rungs replaced by size)")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (docs/eval_scale.json for the record)")
    ap.add_argument("--worker", choices=["ours", "pml"], help=argparse.SUPPRESS)
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        fn = child_ours if args.worker == "ours" else child_pml
        kwargs = {"depth_probe": args.probe} if args.worker == "ours" else {}
        print("RESULT " + json.dumps(fn(args.n, args.classes, **kwargs), default=float), flush=True)
        return
    if args.quick:
        args.n, args.classes, args.ladder = 20_000, 200, [5_000, 10_000]

    command = " ".join(["python", "bench/eval_scale.py", *sys.argv[1:]])
    record = {
        "commands": [command],
        "machine": f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "cap_gib": args.cap_gib,
        "data": {"sigma": SIGMA, "per_class_mean": PER_CLASS, "dim": 128},
        "ladder": [],
    }
    if args.merge and args.out and args.out.exists():  # add rungs (or a new main run) to an earlier record
        record = json.loads(args.out.read_text())
        record["commands"] = [*record.get("commands", [record.pop("command", "")]), command]

    def save():
        if args.out:
            args.out.write_text(json.dumps(record, indent=1, default=float) + "\n")

    def child(kind, n, classes, probe=False):
        extra = ["--probe"] if probe else []
        print(f"-- {kind} n={n:,} classes={classes:,}", flush=True)
        r = run_child([kind, "--n", str(n), "--classes", str(classes), *extra], args.cap_gib, args.timeout)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.get("metrics", {}).items()}
        print(
            f"   {'ok' if r['ok'] else r['why']}  wall {r['wall_s']:.0f}s  peak {r.get('peak_mib', 0):.0f} MiB  {shown}"
        )
        return r

    pml_failed = False
    for n in args.ladder:
        classes = max(2, n // PER_CLASS)
        row = {"n": n, "classes": classes}
        row["pml"] = {"ok": False, "why": "not run: a smaller size already failed"} if pml_failed else None
        if not pml_failed:
            row["pml"] = child("pml", n, classes)
            pml_failed = not row["pml"]["ok"]
        if row["pml"]["ok"] or n == args.ladder[0]:
            row["ours"] = child("ours", n, classes)
        record["ladder"] = sorted([r for r in record["ladder"] if r["n"] != n] + [row], key=lambda r: r["n"])
        save()

    if not args.skip_main:
        if "main" in record:  # a rerun: the earlier run is kept beside it
            record.setdefault("earlier_main", []).append(
                record.pop("main") | {"extrapolation": record.pop("extrapolation", None)}
            )
        record["main"] = {"n": args.n, "classes": args.classes, "ours": child("ours", args.n, args.classes, True)}
        main_row = record["main"]["ours"]
        if main_row["ok"]:
            record["extrapolation"] = extrapolate(args.n, args.classes, main_row)
        save()
    print_table(record)


def extrapolate(n: int, classes: int, r: dict) -> dict:
    """ImageNet-10K (9M images) from this machine's measured rates; the GPU figure is an assumption."""
    N, C, depth = IMAGENET10K["images"], IMAGENET10K["classes"], IMAGENET10K["depth"]
    pairs = n * (n - 1)
    rate = pairs / r["search_s"]  # query-gallery pairs per second at this run's depth
    slower = r[f"probe_depth{depth + 1}_s"] / r[f"probe_depth{r['depth'] + 1}_s"]
    cpu_s = N * (N - 1) / rate * slower
    km_pairs_here = min(n, 256 * classes) * classes * 20 + n * classes
    km_pairs = min(N, 256 * C) * C * 20 + N * C
    nmi_s = r["nmi_s"] * km_pairs / km_pairs_here
    overhead_mib = r["peak_mib"] - n * 128 * 4 / 2**20
    gpu_mac_s = 16.7e12  # assumption: half an H200's 67 TFLOP/s fp32 peak as multiply-adds (cuBLAS sgemm)
    return {
        "rate_pairs_per_s": rate,
        "gmac_per_s": rate * 128 / 1e9,
        "depth_here": r["depth"],
        "depth_1001_slowdown": slower,
        "cpu_search_s": cpu_s,
        "cpu_nmi_s": nmi_s,
        "memory_gib": (N * 128 * 4 / 2**20 + overhead_mib) / 1024,
        "gpu_assumed_mac_per_s": gpu_mac_s,
        "gpu_search_gemm_s": N * N * 128 / gpu_mac_s,
    }


def print_table(record: dict) -> None:
    print("\n| size | library | Recall@1 | R-Prec | MAP@R | NMI | search s | metrics s | NMI s | total s | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [(r["n"], r["classes"], "pml", r["pml"]) for r in record["ladder"]]
    rows += [(r["n"], r["classes"], "ours", r["ours"]) for r in record["ladder"] if "ours" in r]
    if "main" in record:
        rows.append((record["main"]["n"], record["main"]["classes"], "ours", record["main"]["ours"]))
    for n, c, lib, r in sorted(rows, key=lambda t: (t[0], t[2])):
        size = f"{n:,} / {c:,}"
        if not r["ok"]:
            wall, peak = fmt_s(r.get("wall_s")), f"{r['sampled_peak_mib']:,.0f}" if "sampled_peak_mib" in r else "-"
            print(f"| {size} | {lib} | {r['why']} | | | | | | | {wall} | {peak} (sampled) |")
            continue
        m = r["metrics"]
        if lib == "ours":
            metric_s, nmi_s, total = r["recall_s"] + r["r_metrics_s"], r["nmi_s"], r["retrieval_s"] + r["nmi_s"]
        else:
            metric_s, nmi_s, total = r["total_s"] - r["search_s"] - r["kmeans_s"], r["kmeans_s"], r["total_s"]
        print(
            f"| {size} | {lib} | {m['recall@1']:.4f} | {m['r_precision']:.4f} | {m['map@r']:.4f} | {m['nmi']:.4f} "
            f"| {fmt_s(r['search_s'])} | {fmt_s(metric_s)} | {fmt_s(nmi_s)} | {fmt_s(total)} | {r['peak_mib']:,.0f} |"
        )
    if "extrapolation" in record:
        e = record["extrapolation"]
        print(
            f"\nmeasured rate {e['rate_pairs_per_s']:.3g} pairs/s ({e['gmac_per_s']:.1f} GMAC/s) at depth "
            f"{e['depth_here']}; depth 1001 is {e['depth_1001_slowdown']:.2f}x slower. ImageNet-10K (9M): "
            f"CPU search ~{e['cpu_search_s'] / 3600:.0f} h, NMI ~{e['cpu_nmi_s'] / 3600:.1f} h, "
            f"memory ~{e['memory_gib']:.1f} GiB; one GPU (assumed {e['gpu_assumed_mac_per_s'] / 1e12:.1f} TMAC/s): "
            f"GEMM ~{e['gpu_search_gemm_s'] / 60:.0f} min"
        )


if __name__ == "__main__":
    main()
