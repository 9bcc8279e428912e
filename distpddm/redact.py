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
from collections.abc import Iterator

HIDDEN = "***"
# scheme://, then userinfo (no "/" before its "@"), then the rest up to a query, then the query (ending where a
# message's punctuation starts: in a URL it is percent-encoded).
_URL = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)([^\s/@'\"]*@)?([^\s?#'\"]*)(\?[^\s#'\"():,;\]]*)?")


def _query(query: str) -> str:
    """``?a=1&b=2`` -> ``?a=***&b=***``: the names stay (they say what was given), the values go."""
    parts = (p.split("=", 1)[0] + f"={HIDDEN}" if "=" in p else p for p in query[1:].split("&"))
    return "?" + "&".join(parts)


def _one(match: re.Match) -> str:
    scheme, user, rest, query = match.groups()
    if user:  # user:password@ keeps the user; a lone name may be a token (https://TOKEN@host)
        user = f"{user.split(':', 1)[0]}:{HIDDEN}@" if ":" in user else f"{HIDDEN}@"
    return scheme + (user or "") + rest + (_query(query) if query else "")


def redact(text: str) -> str:
    """``text`` with every URL's password and query values replaced by ``***``."""
    return _URL.sub(_one, text) if "://" in text else text


class RedactFilter(logging.Filter):
    """A handler's filter: the record's message and traceback, redacted before any formatter sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
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

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def redacted_output() -> Iterator[None]:
    """The CLI's stdout and stderr, redacted, for as long as a command runs."""
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Redacting(out), _Redacting(err)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = out, err
