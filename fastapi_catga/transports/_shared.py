"""What every transport does the same way, written once.

- `import_guard`: a missing broker client is an ImportError that says which extra to install.
- `frame`: an envelope packed for the wire, refused over the payload limit before anything is sent.
- `deliver`: hands a delivery to a subscriber's callback; a callback that raises is logged and the
  broker client's reader goes on.
- `PendingReplies` (in `_replies`): requests waiting for their reply, each with its deadline; a
  lost connection fails them all at once.
- `WatchQueue`: the member events of one watch, until the watch stops or the connection drops.
- `BadFrames`: unreadable frames received, counted and logged at most once per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi_catga.core.envelope import Envelope, pack
from fastapi_catga.core.logs import LogLimiter
from fastapi_catga.exceptions import MessageTooLargeError
from fastapi_catga.transports._replies import PendingReplies
from fastapi_catga.transports.base import Delivery, DeliveryCallback, MemberEvent

__all__ = ["BadFrames", "PendingReplies", "WatchQueue", "deliver", "fail", "frame", "import_guard"]


@contextlib.contextmanager
def import_guard(extra: str, *, client: str, broker: str) -> Iterator[None]:
    """Turn the broker client missing into an ImportError that names the fix.

    ``extra`` is both the name of the extra and the client's top-level module (``nats``, ``redis``).
    Any other ImportError (say, one of the client's own dependencies is broken) passes unchanged.
    """
    try:
        yield
    except ImportError as e:
        if (e.name or "").partition(".")[0] != extra:
            raise
        raise ImportError(f'{broker} transport needs {client}: pip install "fastapi-catga[{extra}]"') from e


def frame(envelope: Envelope, max_payload: int, broker: str) -> bytes:
    """`pack` an envelope, refusing it over ``max_payload`` bytes.

    The check comes before the broker client builds its command, so nothing is sent.

    Raises:
        MessageTooLargeError: with ``details`` ``{"size": ..., "limit": ...}``.
    """
    data = pack(envelope)
    if len(data) > max_payload:
        raise MessageTooLargeError(
            f"envelope of {len(data)} bytes is over the {max_payload}-byte {broker} payload limit; "
            "nothing was sent",
            details={"size": len(data), "limit": max_payload},
        )
    return data


def deliver(
    callback: DeliveryCallback, delivery: Delivery, subject: str | bytes, log: logging.Logger
) -> None:
    """Call a subscriber's callback; if it raises, log that on ``log`` and carry on reading."""
    try:  # the callback starts a task: awaiting a handler here would serialize the subject
        callback(delivery)
    except Exception:
        where = subject.decode(errors="replace") if isinstance(subject, bytes) else subject
        log.exception("delivery callback for %s failed", where)


def fail(future: asyncio.Future[Any], error: BaseException) -> None:
    """Fail ``future`` with ``error`` unless it is done already."""
    if not future.done():
        future.set_exception(error)


class WatchQueue:
    """The member events of one watch, in order, until `end`; then every iteration ends at once.

    Each transport subclasses it with the ``stop()`` of `MemberWatch`, feeds it with `put` and
    calls `end` when the connection drops.
    """

    def __init__(self) -> None:
        self._events: asyncio.Queue[MemberEvent | None] = asyncio.Queue()

    def __len__(self) -> int:
        """Events waiting to be read."""
        return self._events.qsize()

    def put(self, event: MemberEvent) -> None:
        self._events.put_nowait(event)

    def end(self) -> None:
        self._events.put_nowait(None)

    async def __aiter__(self) -> AsyncIterator[MemberEvent]:
        while (event := await self._events.get()) is not None:
            yield event
        self._events.put_nowait(None)  # ended for good: iterating again ends at once too


class BadFrames:
    """Frames that are no catga frame (garbage, an attack, a foreign client on our subjects).

    Each is counted; a log line is written at most once per interval, with how many were held back,
    so a flood of them cannot flood the log.
    """

    def __init__(self, log: logging.Logger) -> None:
        self.count = 0
        self._log = log
        self._limit = LogLimiter()

    def seen(self, subject: str | bytes, error: Exception) -> None:
        self.count += 1
        where = subject.decode(errors="replace") if isinstance(subject, bytes) else subject
        self._limit.log(
            self._log, logging.WARNING, "frame", "dropped an unreadable message on %s: %s", where, error
        )
