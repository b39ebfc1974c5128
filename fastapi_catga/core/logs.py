"""What may be logged: at most one line per kind and interval (`LogLimiter`), and URLs without their
secrets (`redact_url`)."""

from __future__ import annotations

import logging
import re
import time
import traceback
import urllib.parse
from collections.abc import Callable, Hashable

__all__ = [
    "TRACE_ALL",
    "TRACE_LINE",
    "LogLimiter",
    "bounded_trace",
    "cut",
    "log_bounded",
    "redact_text",
    "redact_url",
    "text_of",
]

#: Characters of one line of a traceback, and of a whole one, that a log line or a span keeps.
TRACE_LINE = 1000
TRACE_ALL = 16_000

_SCHEME = re.compile(r"(?<![^,\s])[A-Za-z][A-Za-z0-9+.-]*://")  # a URL starts a list's item
_SECRET_PARAM = re.compile(r"(?i)\b(password|pass|token|auth)=([^&\s,]*)")


def redact_url(url: str) -> str:
    """The URL (or comma-separated URLs) with every password or token replaced by ``***``.

    ``nats://user:pw@h`` -> ``nats://user:***@h``; ``nats://token@h`` -> ``nats://***@h``;
    ``redis://h/0?password=pw`` -> ``redis://h/0?password=***``. A URL's user part ends at its
    last ``@``, as URL parsers read it: a password may hold ``@``, ``,`` or ``/``.
    """
    pieces, done = [], 0
    for start, end in _userinfo_spans(url):
        user, colon, _ = url[start:end].partition(":")
        pieces += [url[done:start], f"{user}:***" if colon else "***"]
        done = end
    pieces.append(url[done:])
    return _SECRET_PARAM.sub(lambda m: f"{m.group(1)}=***", "".join(pieces))


def redact_text(text: str, url: str) -> str:
    """``text`` (a parser's error, say) with every password or token of ``url`` in it, as written
    or percent-decoded, replaced by ``***``."""
    secrets = {m.group(2) for m in _SECRET_PARAM.finditer(url)}
    for start, end in _userinfo_spans(url):
        user, colon, password = url[start:end].partition(":")
        secrets.add(password if colon else user)
    # A parser that reads the user part only up to a ``#``, ``?`` or ``/`` quotes what comes before.
    secrets |= {urllib.parse.unquote(secret) for secret in secrets}
    secrets |= {cut for secret in secrets if len(cut := re.split(r"[#?/]", secret)[0]) >= 4}
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def _userinfo_spans(url: str) -> list[tuple[int, int]]:
    """Where each URL's user part is: from its ``scheme://`` to its last ``@`` before the next URL."""
    starts = [scheme.end() for scheme in _SCHEME.finditer(url)] or [0]  # none: nats-py's host:port
    stops = [scheme.start() for scheme in _SCHEME.finditer(url)][1:] + [len(url)]
    spans = []
    for start, stop in zip(starts, stops, strict=True):
        at = url.rfind("@", start, stop)
        if at >= 0:
            spans.append((start, at))
    return spans


class LogLimiter:
    """Says whether a log line of some kind may be written now, and how many were held back before.

    Args:
        interval: seconds between two lines of one kind.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, interval: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._last: dict[Hashable, float] = {}
        self._held: dict[Hashable, int] = {}

    def allow(self, kind: Hashable) -> int | None:
        """None when a line of this kind was written less than ``interval`` ago (it is counted as
        held back); otherwise how many were held back since the last one written."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._held[kind] = self._held.get(kind, 0) + 1
            return None
        if len(self._last) > 1000:  # kinds are bounded in practice; never let a bug grow this
            self._last.clear()
        self._last[kind] = now
        return self._held.pop(kind, 0)

    def log(
        self,
        logger: logging.Logger,
        level: int,
        kind: Hashable,
        text: str,
        *args: object,
        exc_info: BaseException | None = None,
    ) -> None:
        """``logger.log(level, text, *args)`` unless a line of this kind was written within the
        interval; the line written says how many were held back since the last one."""
        held = self.allow(kind)
        if held is None:
            return
        more = f" ({held} more since the last report)" if held else ""
        if exc_info is None:
            logger.log(level, text + "%s", *args, more, stacklevel=2)
        else:
            log_bounded(logger, level, text + "%s", *args, more, exc=exc_info, stacklevel=3)


def log_bounded(
    logger: logging.Logger, level: int, text: str, *args: object, exc: BaseException, stacklevel: int = 2
) -> None:
    """``logger.log(level, text, *args, exc_info=exc)`` with the traceback a formatter prints
    bounded (`bounded_trace`): a handler's error text may be megabytes. The exception itself stays
    on the record, for handlers that format it themselves. ``stacklevel`` as `logging.Logger.log`'s."""
    if not logger.isEnabledFor(level):
        return
    fn, lno, func, _ = logger.findCaller(stacklevel=stacklevel)
    raised = (type(exc), exc, exc.__traceback__)
    record = logger.makeRecord(logger.name, level, fn, lno, text, args, raised, func)
    record.exc_text = bounded_trace(exc)
    logger.handle(record)


def text_of(exc: BaseException, attribute: str | None = None) -> str:
    """The error's text (or its ``attribute``), or a word that it has none that can be read (a
    ``__str__`` that raises, a subclass that skipped its base's ``__init__``)."""
    try:
        return str(getattr(exc, attribute) if attribute else exc)
    except Exception as broken:
        return f"{type(exc).__name__} (its text could not be read: {type(broken).__name__})"


def cut(text: str, limit: int = TRACE_LINE) -> str:
    """``text``, or its first ``limit`` characters and how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def bounded_trace(exc: BaseException, *, chain: bool = True) -> str:
    """``exc``'s traceback as ``logging`` formats it, each line cut to `TRACE_LINE` characters and
    the whole to about `TRACE_ALL` (its start and its end, where the error is said)."""
    lines = "".join(traceback.format_exception(exc, chain=chain)).rstrip("\n").split("\n")
    text = "\n".join(cut(line) for line in lines)
    if len(text) <= TRACE_ALL:
        return text
    half = TRACE_ALL // 2
    return f"{text[:half]}\n... ({len(text) - 2 * half} characters of the traceback left out)\n{text[-half:]}"
