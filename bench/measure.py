"""Run a command and measure it: wall time and the peak memory of its whole process tree.

Peak memory is sampled (every 0.2 s) as the sum of the proportional set sizes (PSS: each shared page
divided among the processes that map it) of the command and every process it started -- loader workers,
pool workers, a local Ray cluster's raylet and workers -- which is what a machine must hold. Summing
resident set sizes instead would count torch's pages once per forked loader worker. ``peak_main`` is the
command's own process alone.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass
class Measured:
    seconds: float
    peak_tree_mib: float
    peak_main_mib: float
    returncode: int
    output: str
    at_peak: dict[str, tuple[int, float]]  # process title -> (count, MiB) at the peak sample

    def breakdown(self) -> str:
        rows = sorted(self.at_peak.items(), key=lambda kv: -kv[1][1])
        return ", ".join(f"{name} x{n}: {mib:.0f}" for name, (n, mib) in rows if mib >= 20)

    def row(self) -> dict:
        return {
            "seconds": round(self.seconds, 1),
            "peak_mib": round(self.peak_tree_mib),
            "main_mib": round(self.peak_main_mib),
        }


def _pss(proc: psutil.Process) -> int:
    try:
        return proc.memory_full_info().pss
    except psutil.AccessDenied:
        return proc.memory_info().rss


def _title(proc: psutil.Process) -> str:
    """What the process is: Ray's title (``ray::RayTrainWorker``), else the program and module run."""
    words = proc.cmdline() or [proc.name()]
    if words[0].startswith("ray::"):
        return words[0]
    if "-m" in words[:-1]:
        return f"python -m {words[words.index('-m') + 1]}"
    return " ".join(Path(w).name for w in words[:2])


def _tree_memory(proc: psutil.Process) -> tuple[int, int, dict[str, tuple[int, float]]]:
    try:
        main = _pss(proc)
        processes = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, 0, {}
    total, by_title = 0, {}
    for p in processes:
        with contextlib.suppress(psutil.Error):
            pss = _pss(p)
            total += pss
            n, mib = by_title.get(_title(p), (0, 0.0))
            by_title[_title(p)] = (n + 1, mib + pss / 2**20)
    return total, main, by_title


def run(cmd: list[str], env: dict | None = None, cwd=None, echo: bool = True, timeout: float | None = None) -> Measured:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak: list = [0, 0, {}]
    done = threading.Event()

    def sample() -> None:
        ps = psutil.Process(proc.pid)
        while not done.is_set():
            tree, main, by_title = _tree_memory(ps)
            if tree > peak[0]:
                peak[0], peak[2] = tree, by_title
            peak[1] = max(peak[1], main)
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if echo:
            print(line, end="", flush=True)
    proc.wait(timeout=timeout)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    return Measured(seconds, peak[0] / 2**20, peak[1] / 2**20, proc.returncode, "".join(lines), peak[2])


def print_stages(stages: list[dict]) -> None:
    """A rehearsal's stages as the Markdown table docs/benchmarks.md keeps, then the total time."""
    print("\n| stage | seconds | peak MiB (all processes) | |")
    print("|---|---|---|---|")
    for s in stages:
        print(f"| {s['stage']} | {s['seconds']} | {s.get('peak_mib', '')} | {s['note']} |")
    print(f"\ntotal {sum(s['seconds'] for s in stages) / 60:.1f} min")
