"""What a run tells its user while it runs: rank 0's ``metrics.jsonl``, TensorBoard curves and progress bar,
and distpddm's log lines on every worker."""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path

from ..redact import RedactFilter


class MetricsLog:
    """Rank 0: a JSONL file, TensorBoard curves and a progress bar with ETA."""

    def __init__(self, out: Path, enabled: bool, total: int, start: int, progress: bool):
        self.enabled = enabled
        self.bar = self.tb = self.jsonl = None
        if not enabled:
            return
        from tqdm.auto import tqdm

        out.mkdir(parents=True, exist_ok=True)
        drop_partial_line(out / "metrics.jsonl")
        self.jsonl = open(out / "metrics.jsonl", "a")  # noqa: SIM115 -- lives as long as the run
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(out / "tensorboard"))
        # Under Ray (or any log file) each refresh becomes a line: refresh every 10 s there, not 10 times a second.
        interval = 0.1 if sys.stderr.isatty() else 10.0
        self.bar = tqdm(
            total=total,
            initial=start,
            unit="step",
            desc="train",
            disable=not progress,
            dynamic_ncols=True,
            mininterval=interval,
            maxinterval=max(10.0, interval),
        )

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k.replace("@", "_at_"), v, step)
        if self.bar is not None and "loss" in metrics:
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.3f}",
                spread=f"{metrics.get('spread', 0):.2f}",
                img_s=f"{metrics.get('images_per_s', 0):.0f}",
            )

    def flush(self) -> None:
        for h in (self.tb, self.jsonl):
            if h is not None:
                h.flush()

    def close(self) -> None:
        for h in (self.bar, self.tb, self.jsonl):
            if h is not None:
                h.close()


def drop_partial_line(path: Path) -> None:
    """A killed run may leave half a JSON line at the end of the file: cut it, so that the resumed run's first
    line is not glued to it (every whole line is kept)."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        f.truncate(keep)
    logging.getLogger("distpddm.train").warning(
        "%s ended in half a line (%d bytes, a run killed while writing): removed", path, len(data) - keep
    )


def own_log_handler() -> None:
    """distpddm's INFO messages on stderr through a handler of its own, whatever level Ray gives the root
    logger of its workers (a local cluster quiets Ray's own INFO lines)."""
    top = logging.getLogger("distpddm")
    if not any(getattr(h, "_distpddm", False) for h in top.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        handler._distpddm = True
        handler.addFilter(RedactFilter())  # no URL's password or query values in a worker's log
        top.addHandler(handler)
    top.setLevel(logging.INFO)
    top.propagate = False
