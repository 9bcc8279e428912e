"""What distpddm's messages may show of a URL: never a password or a query's values. Credentials from the
environment or the AWS config files never reach a message, but a URL can carry its own
(``https://user:token@host/...``, a presigned ``...tar?X-Amz-Signature=...``), and URLs are in most messages
about data. So every line the CLI prints about data and every log record of distpddm's handlers passes through
:func:`redact`."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import traceback
from collections.abc import Iterator

HIDDEN = "***"
# scheme://, then userinfo (up to the last "@" before the path: an address may be the user name), then the rest up
# to a query or fragment, then those (to the next space or quote).
_URL = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)([^\s/?#'\"]*@)?([^\s?#'\"]*)([?#][^\s'\"]*)?")
_VALUE = re.compile(r"([?#&;][^=&;#]*=)[^&;#]*")  # a query's or fragment's key=value: the value goes
_TRAILING = re.compile(r"[.,;:)\]]+$")  # a message's punctuation after the URL


def _one(match: re.Match) -> str:
    scheme, user, rest, tail = match.groups()
    if user:  # user:password@ keeps the user; a lone name may be a token (https://TOKEN@host)
        user = f"{user.split(':', 1)[0]}:{HIDDEN}@" if ":" in user else f"{HIDDEN}@"
    if tail:
        end = _TRAILING.search(tail)
        cut = end.start() if end else len(tail)
        tail = _VALUE.sub(rf"\1{HIDDEN}", tail[:cut]) + tail[cut:]
    return scheme + (user or "") + rest + (tail or "")


def redact(text: str) -> str:
    """``text`` with every URL's password and query values replaced by ``***``."""
    return _URL.sub(_one, text) if "://" in text else text


class RedactFilter(logging.Filter):
    """A handler's filter: the record's message and traceback, redacted before any formatter sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 -- a bad format string: the handler reports it, as without this filter
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def redact_handlers(logger: logging.Logger) -> None:
    """Put a :class:`RedactFilter` on each of ``logger``'s handlers that has none."""
    for handler in logger.handlers:
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())


class _Redacting:
    """A text stream whose writes are redacted first (``print`` writes an f-string's line in one call)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_output() -> Iterator[None]:
    """The CLI's stdout and stderr, redacted, for as long as a command runs."""
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (None if s is None else _Redacting(s) for s in (out, err))  # None: a detached process
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err


def redact_uncaught() -> None:
    """Tracebacks of errors nothing caught, redacted: Python prints them through ``sys.excepthook`` (and a
    thread's through ``threading.excepthook``) after the CLI has given its streams back. Callers of the CLI in
    the same process still get the exception itself."""
    import threading

    if getattr(sys.excepthook, "_distpddm", False):
        return

    def hook(kind, value, tb) -> None:
        sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb))))

    def thread_hook(args) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
        sys.stderr.write(redact(f"Exception in thread {name}:\n{text}"))

    hook._distpddm = True
    sys.excepthook, threading.excepthook = hook, thread_hook
