"""`PendingReplies`: requests waiting for their reply, each with its deadline, and one timer for all.

A loop timer per request (``call_later``, then ``cancel`` when the reply comes) cost a few
microseconds on every request, most of them for requests that are answered long before their
deadline. Here each request is a ``(deadline, token)`` entry on a heap, and one timer is armed for
the earliest: when it fires, the requests past their deadline fail with `RequestTimeoutError`
(at the same loop time their own timer would have), and it is armed again for the next one.
Answered requests leave their entry behind; the heap drops them when it gets to them, and is
rebuilt without them once they are more than half of it (as asyncio does with cancelled timers).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Generic, TypeVar

from fastapi_catga.exceptions import RequestTimeoutError

__all__ = ["PendingReplies"]

T = TypeVar("T")
_COMPACT_AT = 256  # answered entries on the heap before it is worth rebuilding


class PendingReplies(Generic[T]):
    """Requests waiting for their reply (a ``T``: whatever the broker client hands over), by token."""

    def __init__(self) -> None:
        self._waiting: dict[str, tuple[asyncio.Future[T], str, float]] = {}
        self._tokens = itertools.count()
        self._deadlines: list[tuple[float, str]] = []  # a heap; answered requests' entries linger
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, subject: str, timeout: float) -> tuple[str, asyncio.Future[T]]:
        """A new token and the future its reply resolves; `RequestTimeoutError` after ``timeout`` s.

        Call `discard` with the token once the request is over, however it ended.
        """
        loop = self._loop
        if loop is None:  # the transport's, for good (its broker client is tied to it too)
            loop = self._loop = asyncio.get_running_loop()  # a getpid() call each time on 3.11
        token, reply = str(next(self._tokens)), loop.create_future()
        self._waiting[token] = (reply, subject, timeout)
        deadline = loop.time() + timeout
        heapq.heappush(self._deadlines, (deadline, token))
        if self._timer is None or deadline < self._timer_at:
            self._arm(loop, deadline)
        return token, reply

    def discard(self, token: str) -> None:
        """Forget a request (its deadline entry is dropped later, with no timer to cancel)."""
        del self._waiting[token]
        deadlines = self._deadlines
        if len(deadlines) > _COMPACT_AT and len(deadlines) > 2 * len(self._waiting):
            self._deadlines = [entry for entry in deadlines if entry[1] in self._waiting]
            heapq.heapify(self._deadlines)

    def resolve(self, token: str, reply: T) -> None:
        """Hand a reply to its request; a reply to a request already over is dropped."""
        waiting = self._waiting.get(token)
        if waiting is not None and not waiting[0].done():
            waiting[0].set_result(reply)

    def fail_all(self, error: Exception) -> None:
        """Fail every request still waiting: its reply would go where nobody listens any more."""
        for reply, _, _ in self._waiting.values():
            if not reply.done():
                reply.set_exception(error)

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = loop.call_at(when, self._expire, loop, when), when

    def _expire(self, loop: asyncio.AbstractEventLoop, fired_for: float) -> None:
        """Fail the requests past their deadline; arm the timer for the earliest one left."""
        self._timer = None
        now = max(loop.time(), fired_for)  # the loop runs a timer up to its clock resolution early
        deadlines, waiting = self._deadlines, self._waiting
        while deadlines and deadlines[0][0] <= now:
            _, token = heapq.heappop(deadlines)
            entry = waiting.get(token)
            if entry is not None and not entry[0].done():
                reply, subject, timeout = entry
                reply.set_exception(RequestTimeoutError(f"no reply on {subject} within {timeout:.3f} s"))
        while deadlines and deadlines[0][1] not in waiting:
            heapq.heappop(deadlines)
        if deadlines:
            self._arm(loop, deadlines[0][0])
