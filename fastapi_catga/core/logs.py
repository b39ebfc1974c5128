"""What may be logged: at most one line per kind and interval (`LogLimiter`), and URLs without their
secrets (`redact_url`)."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Hashable

__all__ = ["LogLimiter", "redact_url"]

_USERINFO = re.compile(r"(?<=//)([^@/\s,]*)@")
_SECRET_PARAM = re.compile(r"(?i)\b(password|pass|token|auth)=[^&\s,]*")


def redact_url(url: str) -> str:
    """The URL (or comma-separated URLs) with every password or token replaced by ``***``.

    ``nats://user:pw@h`` -> ``nats://user:***@h``; ``nats://token@h`` -> ``nats://***@h``;
    ``redis://h/0?password=pw`` -> ``redis://h/0?password=***``.
    """

    def mask(match: re.Match[str]) -> str:
        user, colon, _ = match.group(1).partition(":")
        return f"{user}:***@" if colon else "***@"

    return _SECRET_PARAM.sub(lambda m: f"{m.group(1)}=***", _USERINFO.sub(mask, url))


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
        if held is not None:
            more = f" ({held} more since the last report)" if held else ""
            logger.log(level, text + "%s", *args, more, exc_info=exc_info)
