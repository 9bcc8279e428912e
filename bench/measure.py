"""Run a command and measure it: wall time and the peak memory of its whole process tree.

Peak memory is sampled (every 0.2 s) as the sum of the resident set sizes of the command and every process
it started -- loader workers, pool workers, a local Ray cluster's raylet and workers -- which is what a
machine must hold. ``peak_main`` is the command's own process alone.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from dataclasses import dataclass

import psutil


@dataclass
class Measured:
    seconds: float
    peak_tree_mib: float
    peak_main_mib: float
    returncode: int
    output: str

    def row(self) -> dict:
        return {
            "seconds": round(self.seconds, 1),
            "peak_mib": round(self.peak_tree_mib),
            "main_mib": round(self.peak_main_mib),
        }


def _tree_rss(proc: psutil.Process) -> tuple[int, int]:
    try:
        main = proc.memory_info().rss
        children = proc.children(recursive=True)
    except psutil.Error:
        return 0, 0
    total = main
    for child in children:
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return total, main


def run(cmd: list[str], env: dict | None = None, cwd=None, echo: bool = True, timeout: float | None = None) -> Measured:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0, 0]
    done = threading.Event()

    def sample() -> None:
        ps = psutil.Process(proc.pid)
        while not done.is_set():
            tree, main = _tree_rss(ps)
            peak[0], peak[1] = max(peak[0], tree), max(peak[1], main)
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
    return Measured(seconds, peak[0] / 2**20, peak[1] / 2**20, proc.returncode, "".join(lines))
