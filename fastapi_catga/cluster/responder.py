"""The receiving side of a node: subscriptions, deadline checks, handler runs, replies, drain."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from fastapi_catga.cluster.limits import HandlerLimits
from fastapi_catga.cluster.runs import EAGER_TASKS, Runs, describe
from fastapi_catga.core.dispatch import LocalDispatcher
from fastapi_catga.core.envelope import (
    MESSAGE_TYPE,
    SOURCE,
    STATUS,
    Envelope,
    deadline_of,
    decode_message,
    encode_error,
    encode_result,
    error_from_reply,
)
from fastapi_catga.core.logs import LogLimiter
from fastapi_catga.core.messages import Event, Request
from fastapi_catga.core.observe import Observer
from fastapi_catga.core.raised import owned_run
from fastapi_catga.core.travels import result_not_json
from fastapi_catga.exceptions import (
    CatgaError,
    HandlerNotFoundError,
    MessageTooLargeError,
    NodeUnavailableError,
    RemoteHandlerError,
)
from fastapi_catga.transports.base import Delivery, Reply, Subscription, Transport, unsubscribe_all

__all__ = ["Responder", "event_subject", "node_subject", "type_subject"]

logger = logging.getLogger(__name__)

_MAX_HELD = 10_000  # deliveries kept while held: what a frozen process's socket could have brought

QUEUE_GROUP = "catga"
#: The counters ``/catga/health`` shows, each from zero, so that a dashboard finds every key.
STATS = (
    "requests_handled", "handler_errors", "bad_requests", "expired_dropped", "deadline_cancelled",
    "busy_unanswered", "events_handled", "event_handler_errors", "bad_events", "held_dropped",
)  # fmt: skip


def node_subject(node_id: str) -> str:
    """Where one node takes its commands and queries."""
    return f"node.{node_id}"


def type_subject(type_name: str) -> str:
    """Where any node handling a type takes it (a queue group, on brokers that have them)."""
    return f"type.{type_name}"


def event_subject(type_name: str) -> str:
    """Where every node handling an event type hears it."""
    return f"event.{type_name}"


class Responder:
    """Serves this node's handlers to the cluster.

    Each delivery runs in its own task (a slow handler never holds up others), bounded by the
    caller's deadline: a request whose deadline passed before it ran is dropped unrun, since the
    caller has already moved on (a node resuming from a pause must not run stale work), and a
    handler still running at the deadline is cancelled. Malformed input is answered with a typed
    error where there is a reply address, counted in ``stats``, and logged at most once per
    interval per kind. An ``observer``, if any, is told about each run, drop and refusal.

    Each run takes a slot of ``limits``. A request with no slot free is answered "busy" at once,
    by a small reply task holding nothing of the request (the caller moves on to another node);
    at most a thousand such replies are outstanding, beyond that a request is dropped unanswered
    (its caller times out) rather than let memory grow (see `Runs`). Events wait in the limits'
    bounded queue.
    """

    def __init__(
        self,
        transport: Transport,
        dispatcher: LocalDispatcher,
        *,
        max_payload: int,
        limits: HandlerLimits,
        wall_clock: Callable[[], float] = time.time,
        observer: Observer | None = None,
    ) -> None:
        self._transport = transport
        self._observer = observer
        self._wall_clock = wall_clock
        self._dispatcher = dispatcher
        self._max_payload = max_payload
        self._subscriptions: list[Subscription] = []
        self._limits = limits
        self._log_limit = LogLimiter()
        self._runs = Runs(limits, dispatcher.node_id, self._log_limit)
        self.stats: Counter[str] = Counter(dict.fromkeys(STATS, 0))  # every key, zero or not
        self.node_id = dispatcher.node_id
        #: Set while this process, frozen past the TTL, checks that its node id is still its own:
        #: what arrives meanwhile waits (`hold`), run once the id proves its own, else dropped.
        self.held = False
        self._waiting: list[tuple[Callable[[Delivery], None], Delivery]] = []

    async def start(self) -> None:
        """Subscribe the node's direct subject, its request types' queue groups and its events."""
        subscribe = self._transport.subscribe
        self._subscriptions.append(await subscribe(node_subject(self.node_id), self._on_request))
        if self._transport.supports_queue_groups:
            for message_type in self._dispatcher.requests:
                subject = type_subject(message_type.type_name)
                self._subscriptions.append(await subscribe(subject, self._on_request, queue=QUEUE_GROUP))
        for message_type in self._dispatcher.registry.events:
            self._subscriptions.append(await subscribe(event_subject(message_type.type_name), self._on_event))

    async def stop(self, drain_timeout: float) -> None:
        """Unsubscribe, then wait up to ``drain_timeout`` for work in flight (events still waiting
        for a slot are dropped and counted); cancel what is left and wait at most one second more
        for it to end. A run that ignores its cancellation is abandoned, and named in the log."""
        await unsubscribe_all(self._subscriptions)  # all at once, a frozen broker for a second at most
        self._subscriptions.clear()
        for run in await self._runs.stop(drain_timeout):
            # Its handler ignores the cancellation: answer its caller now, as a run that ended
            # cancelled does, or it waits out its whole deadline.
            if isinstance(run, Delivery) and run.reply is not None:
                what = describe(run)
                await self._send_reply(run.reply, self._stopped(what), what)

    def _type_of(self, envelope: Envelope) -> str:
        """The message type's name, when this node knows it ("?" otherwise: a bounded label)."""
        name = envelope.headers.get(MESSAGE_TYPE)
        return name if type(name) is str and name in self._dispatcher.types else "?"

    def hold(self, held: bool) -> None:
        """Hold what arrives (``held``), or let it go: what waited runs now, each request still
        within its deadline (a replacement has the rest). A node that steps down never lets go:
        its stop drops what waited, unanswered, as the replacement answered it."""
        self.held = held
        if held:
            return
        waiting, self._waiting = self._waiting, []
        for deliver, delivery in waiting:
            deliver(delivery)

    def _hold_back(self, deliver: Callable[[Delivery], None], delivery: Delivery) -> None:
        """Keep a delivery for `hold` to decide on (at most `_MAX_HELD`: past that it is dropped,
        as a frozen process's socket would have held no more). Unanswered meanwhile: a
        replacement subscribed as this node answers it first."""
        if len(self._waiting) < _MAX_HELD:
            self._waiting.append((deliver, delivery))
        else:
            self.stats["held_dropped"] += 1

    def _on_request(self, delivery: Delivery) -> None:
        if self.held:
            self._hold_back(self._on_request, delivery)
            return
        try:
            deadline = deadline_of(delivery.envelope)
        except CatgaError as exc:
            self._refuse(exc, delivery)
            return
        remaining = None if deadline is None else deadline - self._wall_clock()
        if remaining is None or remaining > 0:
            type_name = self._type_of(delivery.envelope)
            if self._limits.enter(type_name):  # the slot is given back when the task ends
                self._runs.spawn(self._answer(delivery, remaining), delivery, type_name, eager=True)
            else:
                self._busy(delivery.reply, type_name, describe(delivery.envelope))
        else:
            self.stats["expired_dropped"] += 1
            if self._observer is not None:
                self._observer.stale_dropped(self._type_of(delivery.envelope))  # a bounded label
            self._log("expired", "dropped %s: its caller's deadline passed before it ran", delivery.envelope)

    def _on_event(self, delivery: Delivery) -> None:
        if self.held:  # a replacement with this node id has it too, if there is one
            self._hold_back(self._on_event, delivery)
            return
        envelope = delivery.envelope
        if envelope.headers.get(SOURCE) == self.node_id:  # local handlers ran at publish
            return
        type_name = self._type_of(envelope)
        now = True

        def start() -> None:  # called with the slot taken, now or once one is free
            # Through 3.11's intake when started now (not from `HandlerLimits.leave`, which starts
            # waiting events as slots come back); not eagerly on 3.12+, where the handlers would
            # run inside the publisher's call on the memory transport.
            self._runs.spawn(self._run_event(envelope), envelope, type_name, eager=now and not EAGER_TASKS)

        self._limits.run_event(type_name, start)
        now = False

    def _busy(self, reply: Reply | None, type_name: str, what: str) -> None:
        """No slot: say "busy" at once (the handler never ran: the caller may go elsewhere)."""
        error = self._limits.refused(type_name)
        if reply is not None and not self._runs.busy(reply, error, what):
            self.stats["busy_unanswered"] += 1

    def _refuse(self, exc: CatgaError, delivery: Delivery) -> None:
        """Malformed input this node will not run: count it, answer it, log it (not too often)."""
        reply = self._cannot_run(delivery.envelope, exc)
        if delivery.reply is not None:  # the task holds the answer, not the request
            self._runs.spawn(self._send_reply(delivery.reply, reply, describe(delivery.envelope)), "refusal")

    async def _answer(self, delivery: Delivery, remaining: float | None) -> None:
        # One coroutine for the usual path (decode, run, reply): each level of the chain costs a
        # frame on every request.
        owned_run()
        envelope = delivery.envelope
        try:
            message = decode_message(envelope, self._dispatcher.types)
        except CatgaError as exc:
            reply: Envelope | None = self._cannot_run(envelope, exc)
        else:
            if not isinstance(message, Request):
                error = HandlerNotFoundError(f"{message.type_name} is an event; publish it instead")
                reply = self._cannot_run(envelope, error)
            else:
                try:
                    if self._observer is not None:
                        reply = await self._observed_request(envelope, message, remaining)
                    else:
                        reply = await self._run_handler(envelope, message, remaining)
                except asyncio.CancelledError as exc:
                    if self._runs.stopping:  # the node stops (`Runs.stop`): its caller moves on now
                        if delivery.reply is not None:
                            what = describe(envelope)
                            await self._send_reply(delivery.reply, self._stopped(what), what)
                        raise
                    # Nobody here cancelled it (a deadline ends a run as `TimeoutError`): its handler
                    # cancelled its own task. That is its error, answered once, as a raised one is;
                    # answered "stopped", its caller would run it again elsewhere.
                    task = asyncio.current_task()
                    if task is not None:
                        task.uncancel()
                    self.stats["handler_errors"] += 1
                    reply = encode_error(
                        self._dispatcher.handler_error(exc, message),
                        node_id=self.node_id,
                        max_payload=self._max_payload,
                    )
        if reply is not None and delivery.reply is not None:
            try:
                try:
                    await delivery.reply(reply)
                except MessageTooLargeError as exc:  # what the broker adds tipped it over: say so
                    await delivery.reply(
                        encode_error(exc, node_id=self.node_id, max_payload=self._max_payload)
                    )
            except CatgaError as exc:
                self._log("reply", "could not answer %s: %s", envelope, exc)

    async def _send_reply(self, send: Reply, reply: Envelope, what: str) -> None:
        try:
            await send(reply)
        except CatgaError as exc:
            self._log_limit.log(logger, logging.WARNING, "reply", "could not answer %s: %s", what, exc)

    def _stopped(self, what: str) -> Envelope:
        """The answer to a request whose run this stopping node cancelled (``what``: `describe`'s
        words for it): the node's own, so that its caller tries another node at once rather than waiting
        out its deadline."""
        error = NodeUnavailableError(
            f"node {self.node_id} stopped while running {what}", node_id=self.node_id
        )
        return encode_error(error, node_id=self.node_id, by_node=True)

    def _cannot_run(self, envelope: Envelope, exc: CatgaError) -> Envelope:
        """The answer to a request this node cannot run (undecodable, unknown type, an event)."""
        self._count_bad("bad_requests", exc.code)
        self._log(type(exc).__name__, "refused %s: %s", envelope, exc)
        return encode_error(exc, node_id=self.node_id, by_node=True)

    async def _observed_request(
        self, envelope: Envelope, message: Request[Any], remaining: float | None
    ) -> Envelope | None:
        assert self._observer is not None
        observer = self._observer
        token = observer.handle_started(message, envelope.headers)
        started = time.perf_counter()
        error: BaseException | None = None
        try:
            reply = await self._run_handler(envelope, message, remaining)
        except BaseException as exc:
            error = exc
            raise
        else:
            if reply is None:
                error = TimeoutError()
            elif reply.headers.get(STATUS) == "error":
                error = error_from_reply(reply)
            return reply
        finally:
            observer.handle_ended(token, message, time.perf_counter() - started, error)

    async def _run_handler(
        self, envelope: Envelope, message: Request[Any], remaining: float | None
    ) -> Envelope | None:
        dispatcher = self._dispatcher
        try:
            pipeline = dispatcher.requests.get(type(message))
            if pipeline is None:  # `handle_request`, without its own coroutine
                raise HandlerNotFoundError(f"no handler for {message.type_name} on node {self.node_id}")
            result = await dispatcher.run_request(pipeline, message, remaining)
        except TimeoutError as exc:
            if not isinstance(exc, CatgaError):  # the caller's deadline: it has moved on, answer nobody
                self.stats["deadline_cancelled"] += 1
                return None
            self.stats["handler_errors"] += 1
            return encode_error(exc, node_id=self.node_id, max_payload=self._max_payload)
        except CatgaError as exc:
            self.stats["handler_errors"] += 1
            return encode_error(exc, node_id=self.node_id, max_payload=self._max_payload)
        self.stats["requests_handled"] += 1
        adapter = type(message).result_adapter()
        try:
            return encode_result(result, adapter, node_id=self.node_id, max_payload=self._max_payload)
        except Exception as exc:  # validated, yet not JSON (an `Any` result holding some object)
            self._log("encode", "could not encode the result of %s: %s", envelope, exc)
            return encode_error(result_not_json(message, self.node_id, exc), node_id=self.node_id)

    async def _run_event(self, envelope: Envelope) -> None:
        owned_run()
        try:
            event = decode_message(envelope, self._dispatcher.types)
        except CatgaError as exc:
            self._count_bad("bad_events", exc.code)
            self._log(type(exc).__name__, "dropped %s: %s", envelope, exc)
            return
        if not isinstance(event, Event):
            self._count_bad("bad_events", "not_event")
            self._log("not_event", "dropped %s: not an event", envelope)
            return
        self.stats["events_handled"] += 1
        if self._observer is None:
            self.stats["event_handler_errors"] += await self._dispatcher.handle_event(event)
            return
        token = self._observer.handle_started(event, envelope.headers)
        started = time.perf_counter()
        try:
            failed = await self._dispatcher.handle_event(event)
        except BaseException as exc:  # cancelled at shutdown
            self._observer.handle_ended(token, event, time.perf_counter() - started, exc)
            raise
        self.stats["event_handler_errors"] += failed
        error = RemoteHandlerError(f"{failed} handler(s) of {event.type_name} failed") if failed else None
        self._observer.handle_ended(token, event, time.perf_counter() - started, error)

    def _count_bad(self, stat: str, kind: str) -> None:
        self.stats[stat] += 1
        if self._observer is not None:
            self._observer.bad_message(kind)

    def _log(self, kind: str, text: str, envelope: Envelope, *args: Any) -> None:
        self._log_limit.log(logger, logging.WARNING, kind, text, describe(envelope), *args)
