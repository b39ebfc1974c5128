"""Hooks for operators' tools: what the cluster layer reports, and where trace context travels.

An `Observer` is told about sends, attempts, failovers, handler runs, membership and the broker
connection. Every method of the base class does nothing: subclass it and override what you need
(`fastapi_catga.otel.TracingObserver` and `fastapi_catga.prometheus.PrometheusObserver` do).
Install observers with ``build(..., observers=[...])`` or ``catga_lifespan(observers=[...])``.

With none installed the cluster layer holds ``None`` and skips each call on one ``is None`` check;
in-process sends keep their direct path. With one installed, every ``send`` goes through the
cluster's sender (this node included, as a target like any other), so each one is seen.

A ``*_started`` method returns a token that the matching ``*_ended`` gets back; both run in the
same task, so a tracer may make its span current in between.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Protocol, runtime_checkable

from fastapi_catga.core.messages import Event, Message
from fastapi_catga.exceptions import CatgaError, RemoteHandlerError

__all__ = ["MetricsSource", "Observer", "combine", "observed_events", "outcome_of"]


def outcome_of(error: BaseException | None) -> str:
    """A bounded label for how something ended: ``ok``, a `CatgaError`'s code, ``cancelled`` or ``error``;
    ``timeout`` for the builtin `TimeoutError` too: a run cancelled at its caller's deadline ends so
    (a handler's own one is a `RemoteHandlerError` by then), as its caller's `RequestTimeoutError` is."""
    if error is None:
        return "ok"
    if isinstance(error, CatgaError):
        return error.code
    if isinstance(error, TimeoutError):
        return "timeout"
    return "cancelled" if isinstance(error, asyncio.CancelledError) else "error"


class Observer:
    """No-op hooks the cluster layer calls; override the ones you need.

    ``operation`` is ``send``, ``broadcast`` or ``publish``. ``node_id`` of an attempt is the target
    (``""`` when the broker picks one from the type's queue group). ``outcome`` is `outcome_of`
    the error, if any. Durations are seconds.
    """

    def bind(self, node_id: str) -> None:
        """The node this observer reports for (called once, when the node is built)."""

    def send_started(self, message: Message, operation: str) -> object:
        """A send, broadcast or publish begins here."""
        return None

    def send_ended(
        self, token: object, message: Message, operation: str, seconds: float, error: BaseException | None
    ) -> None:
        """It ended, with ``error`` or not, after ``seconds`` (the round trip, retries included)."""

    def attempt_started(self, message: Message, node_id: str, attempt: int) -> object:
        """One attempt of a send on one node (``attempt`` counts from 1)."""
        return None

    def attempt_ended(
        self, token: object, message: Message, node_id: str, attempt: int, error: BaseException | None
    ) -> None:
        """The attempt ended; ``error`` is what went wrong with it, the handler's error included."""

    def failover(self, message: Message, node_id: str, error: CatgaError) -> None:
        """A send moves on from ``node_id`` to another node after ``error``."""

    def inject(self, headers: dict[str, str]) -> None:
        """Add trace context to the headers of a message about to leave (the current attempt's), or
        to be stored (a durable message's: its runs get them back in `handle_started`)."""

    def handle_started(self, message: Message, headers: Mapping[str, str]) -> object:
        """A handler is about to run here for a received message (``headers`` are its envelope's, as
        stored for a durable one; empty for an attempt routed to this node or this node's own
        handlers of an event it publishes, which run in the sender's context)."""
        return None

    def handle_ended(
        self, token: object, message: Message, seconds: float, error: BaseException | None
    ) -> None:
        """The handler run ended (for events: ``error`` is set when a handler failed)."""

    def stale_dropped(self, type_name: str) -> None:
        """A request arrived after its caller's deadline and was dropped unrun."""

    def bad_message(self, kind: str) -> None:
        """A received message could not be run (malformed, unknown type, wrong kind): ``kind`` names why."""

    def overloaded(self, type_name: str, outcome: str) -> None:
        """This node had no handler slot (``CATGA_MAX_IN_FLIGHT*``): ``outcome`` is ``busy`` (a
        request was refused, its caller moves on) or ``dropped`` (an event overflowed the queue)."""

    def member_joined(self, node_id: str, size: int) -> None:
        """A node joined this node's view; ``size`` members now."""

    def member_left(self, node_id: str, size: int, *, evicted: bool) -> None:
        """A node left (``evicted``: silent past the TTL, not a graceful leave)."""

    def connection_changed(self, connected: bool) -> None:
        """The broker connection was lost, or is back."""

    def redelivered(self, type_name: str, deliveries: int) -> None:
        """A durable message failed and goes back to its queue for another delivery."""

    def dead_lettered(self, type_name: str, reason: str) -> None:
        """A durable message went to the dead-letter store."""


@runtime_checkable
class MetricsSource(Protocol):
    """An observer that serves metrics: ``GET /catga/metrics`` answers with what it renders."""

    def render_metrics(self) -> tuple[bytes, str]:
        """The metrics and their content type."""
        ...


class _Fanout(Observer):
    """Several observers as one; tokens travel as a tuple, one per observer."""

    def __init__(self, observers: tuple[Observer, ...]) -> None:
        self.observers = observers

    def bind(self, node_id: str) -> None:
        for observer in self.observers:
            observer.bind(node_id)

    def send_started(self, message: Message, operation: str) -> object:
        return tuple(o.send_started(message, operation) for o in self.observers)

    def send_ended(
        self, token: object, message: Message, operation: str, seconds: float, error: BaseException | None
    ) -> None:
        assert isinstance(token, tuple)
        for observer, one in zip(reversed(self.observers), reversed(token), strict=True):
            observer.send_ended(one, message, operation, seconds, error)

    def attempt_started(self, message: Message, node_id: str, attempt: int) -> object:
        return tuple(o.attempt_started(message, node_id, attempt) for o in self.observers)

    def attempt_ended(
        self, token: object, message: Message, node_id: str, attempt: int, error: BaseException | None
    ) -> None:
        assert isinstance(token, tuple)
        for observer, one in zip(reversed(self.observers), reversed(token), strict=True):
            observer.attempt_ended(one, message, node_id, attempt, error)

    def failover(self, message: Message, node_id: str, error: CatgaError) -> None:
        for observer in self.observers:
            observer.failover(message, node_id, error)

    def inject(self, headers: dict[str, str]) -> None:
        for observer in self.observers:
            observer.inject(headers)

    def handle_started(self, message: Message, headers: Mapping[str, str]) -> object:
        return tuple(o.handle_started(message, headers) for o in self.observers)

    def handle_ended(
        self, token: object, message: Message, seconds: float, error: BaseException | None
    ) -> None:
        assert isinstance(token, tuple)
        for observer, one in zip(reversed(self.observers), reversed(token), strict=True):
            observer.handle_ended(one, message, seconds, error)

    def stale_dropped(self, type_name: str) -> None:
        for observer in self.observers:
            observer.stale_dropped(type_name)

    def bad_message(self, kind: str) -> None:
        for observer in self.observers:
            observer.bad_message(kind)

    def overloaded(self, type_name: str, outcome: str) -> None:
        for observer in self.observers:
            observer.overloaded(type_name, outcome)

    def member_joined(self, node_id: str, size: int) -> None:
        for observer in self.observers:
            observer.member_joined(node_id, size)

    def member_left(self, node_id: str, size: int, *, evicted: bool) -> None:
        for observer in self.observers:
            observer.member_left(node_id, size, evicted=evicted)

    def connection_changed(self, connected: bool) -> None:
        for observer in self.observers:
            observer.connection_changed(connected)

    def redelivered(self, type_name: str, deliveries: int) -> None:
        for observer in self.observers:
            observer.redelivered(type_name, deliveries)

    def dead_lettered(self, type_name: str, reason: str) -> None:
        for observer in self.observers:
            observer.dead_lettered(type_name, reason)


async def observed_events(
    observer: Observer, event: Event, headers: Mapping[str, str], run: Callable[[], Awaitable[int]]
) -> int:
    """Run an event's handlers here (``run`` returns how many failed), told as one handler run."""
    token = observer.handle_started(event, headers)
    started = time.perf_counter()
    try:
        failed = await run()
    except BaseException as exc:  # cancelled at shutdown
        observer.handle_ended(token, event, time.perf_counter() - started, exc)
        raise
    error = RemoteHandlerError(f"{failed} handler(s) of {event.type_name} failed") if failed else None
    observer.handle_ended(token, event, time.perf_counter() - started, error)
    return failed


def combine(observers: Iterable[Observer]) -> Observer | None:
    """One observer standing for all of ``observers``; None when there are none (nothing to call)."""
    found = tuple(observers)
    if not found:
        return None
    return found[0] if len(found) == 1 else _Fanout(found)
