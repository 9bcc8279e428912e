"""Stop requests (preemption): every rank saves a checkpoint at the current step, then the run exits resumable.

A request comes from a signal (SIGUSR1 or SIGTERM, e.g. Slurm's ``--signal`` before the time limit) or from
the file ``stop_request`` in the run folder. ``distpddm train --local`` (each torchrun process too) handles
the signals itself; on Ray only the driver gets them, so it writes that file (on the shared storage), which
rank 0 polls. :meth:`StopWatch.agreed` turns any rank's request into every rank's, at the same step, so nobody
waits in a collective. The workers then return normally -- Ray Train spends no retry on it -- leaving
``preempted.json`` (the step) for the driver, which exits with :data:`EXIT_PREEMPTED`; the same command
resumes from that checkpoint.

The signal handler (:func:`request`) only records the signal: one assignment, no logging, I/O, lock or
thread. A handler runs between two bytecodes of the main thread, and a second signal's inside the first's
(Slurm's TERM and the batch script's forwarded one arrive together): logging there raises ``RuntimeError:
reentrant call`` when it interrupts a write to the same stream, and a lock taken there (``Event.set`` takes
one) deadlocks when the interrupted code holds it. A watcher thread, started by the first :func:`install`,
acts on the request outside the handler, once: it logs it, or runs the ``on_request`` given to
:func:`install` (the Ray driver's: log, and write the request file).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from .outputs import RunOutput

log = logging.getLogger("distpddm.train")

STOP_REQUEST = "stop_request"  # in the run folder: written by the driver (or a user), polled by rank 0
PREEMPTED = "preempted.json"  # in the run folder: the step whose checkpoint a rerun resumes from
EXIT_PREEMPTED = 3  # `distpddm train`'s exit status when it stopped on request, resumable
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

WATCH_S = 0.05  # how often the watcher thread looks for a request (the training loop reads it every step)

# The handler's only write: the first signal since the last restore() (0: none; -1: a request without one).
_signum = 0
_lock = threading.Lock()  # never taken in a handler: the watcher, install() and restore()
_on_request: Callable[[str], None] | None = None  # install()'s; None: log the request
_served: Callable[[str], None] | None = None  # the action already run for the current request
_watcher: threading.Thread | None = None


class Preempted(Exception):  # noqa: N818 -- an outcome, not an error
    """The run stopped on request after saving its checkpoint at ``step``."""

    def __init__(self, step: int, location: str):
        super().__init__(f"stopped on request at step {step}")
        self.step, self.location = step, location


def request(signum: int | None = None, _frame=None) -> None:
    """Ask this process's training loop to stop at the next step: the signal handler. It records the signal and
    nothing else (safe however signals nest); the watcher thread logs it and runs ``on_request``."""
    global _signum
    if not _signum:
        _signum = signum or -1


def pending() -> bool:
    """A signal came to this process (before the run could pass it on, e.g. while Ray started)."""
    return _signum != 0


def _what(signum: int) -> str:
    return signal.Signals(signum).name if signum > 0 else "a stop request"


def _log_request(what: str) -> None:
    log.warning("%s: saving a checkpoint at the next step, then stopping", what)


def _serve() -> None:
    """Act on a pending request with the installed action, unless that action already has (once each)."""
    global _served
    with _lock:
        action = _on_request or _log_request
        if not _signum or _served is action:
            return
        _served = action
        try:
            action(_what(_signum))
        except Exception:  # noqa: BLE001 -- the watcher outlives a failed action (not retried)
            log.exception("acting on a stop request (%s)", _what(_signum))


def _watch() -> None:
    while True:
        time.sleep(WATCH_S)
        if _signum:
            _serve()


class Installed(NamedTuple):
    """What :func:`install` replaced, for :func:`restore`."""

    handlers: dict
    on_request: Callable[[str], None] | None


def install(on_request: Callable[[str], None] | None = None) -> Installed:
    """:func:`request` as the handler of :data:`SIGNALS` (main thread only), and ``on_request(what)`` (``what``:
    the signal's name) as the action on a request -- run once per request, by the watcher thread, within
    :data:`WATCH_S`, also for a request that came before (by default: log it). Returns what it replaced, for
    :func:`restore`. The CLI installs first thing, so a signal during start-up is kept, not fatal."""
    global _on_request, _watcher
    if threading.current_thread() is not threading.main_thread():
        return Installed({}, _on_request)
    with _lock:
        previous = Installed({s: signal.signal(s, request) for s in SIGNALS}, _on_request)
        _on_request = on_request
        if _watcher is None:
            _watcher = threading.Thread(target=_watch, name="distpddm-stop-watch", daemon=True)
            _watcher.start()
    return previous


def restore(previous: Installed) -> None:
    """The handlers and action before :func:`install`; a request not acted on is dropped. Waits for an action
    under way (the driver's write of the request file) to end."""
    global _on_request, _signum, _served
    for s, h in previous.handlers.items():
        signal.signal(s, h)
    with _lock:
        _on_request = previous.on_request
        _signum, _served = 0, None


def ignore_late() -> None:
    """Ignore :data:`SIGNALS` from now on (main thread only): the run has stopped and said how. Python puts
    back the default action of a signal it handles at interpreter exit, so a second stop signal during the
    teardown (Slurm's TERM beside the forwarded one) would kill a run that saved its checkpoint (exit -10, not
    3); an ignored signal stays ignored."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)


class StopWatch:
    """Per-step check: this process's signal flag, and (rank 0) the run folder's request file at most every
    ``poll_s`` seconds (a remote folder costs a request per poll)."""

    def __init__(self, out: RunOutput, rank: int, poll_s: float = 1.0):
        self.out, self.rank, self.poll_s = out, rank, poll_s
        self._next_poll = 0.0

    def _local(self) -> bool:
        if pending():
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
