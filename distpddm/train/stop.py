"""Stop requests (preemption): every rank saves a checkpoint at the current step, then the run exits resumable.

A request comes from a signal (SIGUSR1 or SIGTERM, e.g. Slurm's ``--signal`` before the time limit) or from
the file ``stop_request`` in the run folder. ``distpddm train --local`` (each torchrun process too) handles
the signals itself; on Ray only the driver gets them, so it writes that file (on the shared storage), which
rank 0 polls. :meth:`StopWatch.agreed` turns any rank's request into every rank's, at the same step, so nobody
waits in a collective. The workers then return normally -- Ray Train spends no retry on it -- leaving
``preempted.json`` (the step) for the driver, which exits with :data:`EXIT_PREEMPTED`; the same command
resumes from that checkpoint.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time

from .outputs import RunOutput

log = logging.getLogger("distpddm.train")

STOP_REQUEST = "stop_request"  # in the run folder: written by the driver (or a user), polled by rank 0
PREEMPTED = "preempted.json"  # in the run folder: the step whose checkpoint a rerun resumes from
EXIT_PREEMPTED = 3  # `distpddm train`'s exit status when it stopped on request, resumable
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_requested = threading.Event()  # set by a signal in this process


class Preempted(Exception):  # noqa: N818 -- an outcome, not an error
    """The run stopped on request after saving its checkpoint at ``step``."""

    def __init__(self, step: int, location: str):
        super().__init__(f"stopped on request at step {step}")
        self.step, self.location = step, location


def request(signum: int | None = None, _frame=None) -> None:
    """Ask this process's training loop to stop at the next step (a signal handler)."""
    if not _requested.is_set() and signum is not None:
        log.warning("%s: saving a checkpoint at the next step, then stopping", signal.Signals(signum).name)
    _requested.set()


def pending() -> bool:
    """A signal came to this process (before the run could pass it on, e.g. while Ray started)."""
    return _requested.is_set()


def install(handler=request) -> dict:
    """``handler`` for :data:`SIGNALS` (main thread only); returns the previous handlers for :func:`restore`.
    The CLI installs :func:`request` first thing, so a signal during start-up is kept, not fatal."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in SIGNALS}


def restore(previous: dict) -> None:
    """The handlers before :func:`install`; a request not acted on is dropped."""
    for s, h in previous.items():
        signal.signal(s, h)
    _requested.clear()


class StopWatch:
    """Per-step check: this process's signal flag, and (rank 0) the run folder's request file at most every
    ``poll_s`` seconds (a remote folder costs a request per poll)."""

    def __init__(self, out: RunOutput, rank: int, poll_s: float = 1.0):
        self.out, self.rank, self.poll_s = out, rank, poll_s
        self._next_poll = 0.0

    def _local(self) -> bool:
        if _requested.is_set():
            return True
        if self.rank != 0 or time.monotonic() < self._next_poll:
            return False
        self._next_poll = time.monotonic() + self.poll_s
        return self.out.read_text(STOP_REQUEST) is not None

    def agreed(self, device) -> bool:
        """Collective: True on every rank when any rank has a request."""
        from ..dist import any_rank  # here: the CLI imports this module before anything heavy (torch)

        return any_rank(self._local(), device)


def write_preempted(out: RunOutput, step: int) -> None:
    out.write_text(PREEMPTED, json.dumps({"step": step}))


def read_preempted(out: RunOutput) -> int | None:
    """The step a stopped run saved, when the last attempt stopped on request."""
    text = out.read_text(PREEMPTED)
    return None if text is None else int(json.loads(text)["step"])


def clear(out: RunOutput) -> None:
    """A new attempt: an earlier one's request and outcome do not hold for it."""
    out.remove(STOP_REQUEST)
    out.remove(PREEMPTED)
