"""`HandlerLimits`: how many handlers may run at once on this node, in all and per message type,
and the bounded queue where received events wait for room.

A command or query beyond a limit is refused at once with `BusyError` (the caller moves on to
another node); an event waits in the queue, and what overflows the queue is dropped, counted and
logged (plain events are at-most-once anyway). The queue keeps each type's events first in first
out, and the types with events waiting take turns: an event whose type is at its own limit never
holds back events of other types.

Every request this node runs takes its slot from the one `HandlerLimits` of the node: a request
from another node, a ``send`` routed to this node, and the in-process fast path, so the same call
meets the same limit on every path; so does every event received from another node. Two kinds of
run take no slot: this node's own handlers of an event it publishes (a plain ``publish`` runs them
in the publisher's task, and the publisher waiting for them is its own backpressure), and durable
handlers, which ``CATGA_DURABLE_CONCURRENCY`` bounds.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any

from fastapi_catga.core.logs import LogLimiter
from fastapi_catga.core.messages import Message
from fastapi_catga.core.observe import Observer
from fastapi_catga.core.pipeline import Pipeline
from fastapi_catga.exceptions import BusyError, ConfigurationError

__all__ = ["HandlerLimits"]

logger = logging.getLogger(__name__)


class HandlerLimits:
    """Slots for handler runs on one node.

    Args:
        max_in_flight: handler runs at once on the node; 0 for no limit.
        per_type: runs of one message type at once; 0 for only the node's limit. A message class
            may set its own with ``max_in_flight: ClassVar[int | None]``.
        max_queued_events: received events that may wait for a slot; more are dropped.
        types: the message types this node handles (their own limits are read once, here).
        node_id: this node, named in errors and logs.
        observer: told about each refusal and each dropped event.
        log_limit: how often a kind of overload line may be logged (injectable clock for tests).

    Raises:
        ConfigurationError: a message class sets ``max_in_flight`` to something other than a
            positive int.
    """

    def __init__(
        self,
        max_in_flight: int,
        per_type: int,
        max_queued_events: int,
        types: Iterable[type[Message]],
        *,
        node_id: str,
        observer: Observer | None = None,
        log_limit: LogLimiter | None = None,
    ) -> None:
        self.limit = max_in_flight or sys.maxsize
        self._default_cap = per_type or self.limit
        self._caps: dict[str, int] = {}
        for message_type in types:
            own: Any = message_type.max_in_flight
            if own is None:
                continue
            if type(own) is not int or own < 1:
                raise ConfigurationError(
                    f"{message_type.__name__}.max_in_flight must be a positive int or None, got {own!r}"
                )
            self._caps[message_type.type_name] = own
        self.max_queued_events = max_queued_events
        self.node_id = node_id
        #: Handler runs going on now.
        self.in_flight = 0
        #: ``busy``: requests refused; ``events_dropped``: events the full queue could not take.
        self.stats: Counter[str] = Counter({"busy": 0, "events_dropped": 0})
        self._running: dict[str, int] = {}
        # Events waiting, per type and first in first out within it; ``ready`` holds, in turn, the
        # types among them with room under their own cap (only the node's limit holds them back).
        # A waiting type is in ``ready`` exactly when it is below its cap, so that starting one is
        # O(1) and a type at its cap is never looked at until one of its runs ends.
        self._waiting: dict[str, deque[Callable[[], None]]] = {}
        self.ready: deque[str] = deque()
        self._queued = 0
        self._observer = observer
        self._log_limit = log_limit or LogLimiter()

    def cap(self, type_name: str) -> int:
        """How many runs of this type may go on at once here."""
        return min(self.limit, self._caps.get(type_name, self._default_cap))

    def within_cap(self, pipeline: Pipeline, type_name: str) -> Pipeline:
        """``pipeline`` for a caller that takes the node's share of a slot itself, inline, as the
        in-process ``send`` does (``in_flight += 1`` below ``limit``; when the run ends,
        ``in_flight -= 1``, then `start_waiting` if `ready`): as it is for a type with no cap of
        its own, else within that cap (`BusyError` at once when it is reached)."""
        cap = self._caps.get(type_name, self._default_cap)
        if cap >= self.limit:
            return pipeline
        running = self._running

        async def capped(message: Any) -> Any:
            count = running.get(type_name, 0)
            if count >= cap:
                raise self.refused(type_name)
            running[type_name] = count + 1
            try:
                return await pipeline(message)
            finally:
                self._release_type(type_name)

        return capped

    @property
    def events_waiting(self) -> int:
        """Received events waiting for a slot."""
        return self._queued

    def enter(self, type_name: str) -> bool:
        """Take a slot for one run of ``type_name``; False when a limit is reached. Whoever got
        True calls `leave` once the run ends, however it ends."""
        running = self._running.get(type_name, 0)
        if self.in_flight >= self.limit or running >= self._caps.get(type_name, self._default_cap):
            return False
        self.in_flight += 1
        self._running[type_name] = running + 1
        return True

    def leave(self, type_name: str) -> None:
        """Give a slot back; events waiting for one start now if they fit."""
        self.in_flight -= 1  # `_release`, inline: this runs at the end of every run
        self._release_type(type_name)
        if self.ready:
            self.start_waiting()

    def refused(self, type_name: str) -> BusyError:
        """Count a request refused for want of a slot; the error that says so."""
        self.stats["busy"] += 1
        if self._observer is not None:
            self._observer.overloaded(type_name, "busy")
        cap = self.cap(type_name)
        self._log_limit.log(
            logger, logging.WARNING, "busy", "node %s is busy: refused %s (%d handler runs going on, "
            "limit %d for the node, %d for the type)",
            self.node_id, type_name, self.in_flight, self.limit, cap,
        )  # fmt: skip
        return BusyError(
            f"node {self.node_id} is busy: {type_name} is at its limit of handler runs at once "
            "(CATGA_MAX_IN_FLIGHT, CATGA_MAX_IN_FLIGHT_PER_TYPE or the type's max_in_flight); try later",
            node_id=self.node_id,
        )

    def run_event(self, type_name: str, start: Callable[[], None]) -> None:
        """Call ``start`` with a slot taken for ``type_name`` (it must `leave` when its run ends):
        now if there is room and no event of its type waits before it, later otherwise; when the
        queue is full the event is dropped, counted and logged."""
        if type_name not in self._waiting and self.enter(type_name):
            try:
                start()
            except BaseException:
                self.leave(type_name)
                raise
            return
        if self._queued >= self.max_queued_events:
            self.stats["events_dropped"] += 1
            if self._observer is not None:
                self._observer.overloaded(type_name, "dropped")
            self._log_limit.log(
                logger, logging.WARNING, "events_dropped", "node %s dropped a %s event: %d events already "
                "wait for a handler slot (CATGA_MAX_QUEUED_EVENTS)",
                self.node_id, type_name, self._queued,
            )  # fmt: skip
            return
        queue = self._waiting.get(type_name)
        if queue is None:
            queue = self._waiting[type_name] = deque()
            if self._running.get(type_name, 0) < self._caps.get(type_name, self._default_cap):
                self.ready.append(type_name)  # only the node's limit holds it back
        queue.append(start)
        self._queued += 1

    def drop_waiting(self) -> int:
        """Forget the events still waiting (the node is stopping); how many there were."""
        dropped = self._queued
        self.stats["events_dropped"] += dropped
        self._waiting.clear()
        self.ready.clear()
        self._queued = 0
        return dropped

    def _release(self, type_name: str) -> None:
        self.in_flight -= 1
        self._release_type(type_name)

    def _release_type(self, type_name: str) -> None:
        running = self._running[type_name] - 1
        if running:
            self._running[type_name] = running
        else:
            del self._running[type_name]  # the dict stays as small as what runs
        if type_name in self._waiting and running == self._caps.get(type_name, self._default_cap) - 1:
            self.ready.append(type_name)  # it was at its cap: its waiting events may go again

    def start_waiting(self) -> None:
        # Ready types take turns, one event each, while the node has room: a type with many events
        # waiting cannot starve one with few.
        ready, waiting = self.ready, self._waiting
        while ready and self.in_flight < self.limit:
            type_name = ready.popleft()
            queue = waiting[type_name]
            start = queue.popleft()
            self._queued -= 1
            self.in_flight += 1  # room is certain: it was ready, and the node is below its limit
            running = self._running[type_name] = self._running.get(type_name, 0) + 1
            if not queue:
                del waiting[type_name]
            elif running < self._caps.get(type_name, self._default_cap):
                ready.append(type_name)
            try:
                start()
            except Exception:  # called from another run's end: log it, and start the rest
                self._release(type_name)
                logger.exception("node %s could not start a waiting %s event", self.node_id, type_name)
