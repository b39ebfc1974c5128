"""The receiving side of a node: subscriptions, deadline checks, handler runs, replies, drain."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi_catga.core.dispatch import LocalDispatcher
from fastapi_catga.core.envelope import (
    SOURCE,
    Envelope,
    deadline_of,
    decode_message,
    encode_error,
    encode_result,
)
from fastapi_catga.core.messages import Event, Request
from fastapi_catga.exceptions import CatgaError, HandlerNotFoundError, RemoteHandlerError
from fastapi_catga.transports.base import Delivery, Subscription, Transport

__all__ = ["Responder", "event_subject", "node_subject", "type_subject"]

logger = logging.getLogger(__name__)

QUEUE_GROUP = "catga"
REAP_INTERVAL = 0.05  # s: how late, at most, a handler is cancelled after its caller's deadline


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
    caller has already moved on (a node resuming from a pause must not run stale work).
    """

    def __init__(
        self,
        transport: Transport,
        dispatcher: LocalDispatcher,
        *,
        max_payload: int,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._transport = transport
        self._wall_clock = wall_clock
        self._dispatcher = dispatcher
        self._max_payload = max_payload
        self._subscriptions: list[Subscription] = []
        self._tasks: dict[asyncio.Task[None], float] = {}  # work in flight -> loop time its caller gives up
        self._reaper: asyncio.Task[None] | None = None
        self.stats: Counter[str] = Counter()

    @property
    def node_id(self) -> str:
        return self._dispatcher.node_id

    async def start(self) -> None:
        """Subscribe the node's direct subject, its request types' queue groups and its events."""
        self._reaper = asyncio.get_running_loop().create_task(self._reap_late_work(), name="catga-reaper")
        subscribe = self._transport.subscribe
        self._subscriptions.append(await subscribe(node_subject(self.node_id), self._on_request))
        if self._transport.supports_queue_groups:
            for message_type in self._dispatcher.requests:
                subject = type_subject(message_type.type_name)
                self._subscriptions.append(await subscribe(subject, self._on_request, queue=QUEUE_GROUP))
        for message_type in self._dispatcher.registry.events:
            self._subscriptions.append(await subscribe(event_subject(message_type.type_name), self._on_event))

    async def stop(self, drain_timeout: float) -> None:
        """Unsubscribe, then wait up to ``drain_timeout`` for work in flight; cancel what is left."""
        for subscription in self._subscriptions:
            try:
                await subscription.unsubscribe()
            except CatgaError as exc:
                logger.debug("unsubscribe failed: %s", exc)
        self._subscriptions.clear()
        if self._reaper is not None:
            self._reaper.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=drain_timeout)
            for task in pending:
                task.cancel()
            if pending:
                logger.warning(
                    "cancelled %d handler run(s) still going after %.1f s", len(pending), drain_timeout
                )

    def _spawn(self, work: Coroutine[Any, Any, None], deadline: float = math.inf) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks[task] = deadline
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        del self._tasks[task]

    def _on_request(self, delivery: Delivery) -> None:
        remaining = self._remaining(delivery.envelope)
        if remaining is None:
            self._spawn(self._answer(delivery))
        elif remaining > 0:
            self._spawn(self._answer(delivery), asyncio.get_running_loop().time() + remaining)
        else:
            self.stats["expired_dropped"] += 1
            logger.info(
                "dropped %s: its caller's deadline passed before it ran", _describe(delivery.envelope)
            )

    def _remaining(self, envelope: Envelope) -> float | None:
        deadline = deadline_of(envelope)
        return None if deadline is None else deadline - self._wall_clock()

    async def _reap_late_work(self) -> None:
        """Cancel handlers still running after their caller gave up: they would only duplicate the
        work of the retry that caller has made elsewhere. One sweep a tick, not a timer a request."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(REAP_INTERVAL)
            now = loop.time()
            late = [task for task, deadline in self._tasks.items() if deadline < now and not task.done()]
            for task in late:
                self.stats["deadline_cancelled"] += 1
                task.cancel()

    def _on_event(self, delivery: Delivery) -> None:
        if delivery.envelope.headers.get(SOURCE) != self.node_id:  # local handlers ran at publish
            self._spawn(self._run_event(delivery.envelope))

    async def _answer(self, delivery: Delivery) -> None:
        envelope = delivery.envelope
        reply = await self._run_request(envelope)
        if delivery.reply is not None:
            try:
                await delivery.reply(reply)
            except CatgaError as exc:
                logger.warning("could not answer %s: %s", _describe(envelope), exc)

    async def _run_request(self, envelope: Envelope) -> Envelope:
        try:
            message = decode_message(envelope, self._dispatcher.types)
            if not isinstance(message, Request):
                raise HandlerNotFoundError(f"{message.type_name} is an event; publish it instead")
            result = await self._dispatcher.handle_request(message)
            self.stats["requests_handled"] += 1
            return encode_result(
                result, type(message).result_adapter(), node_id=self.node_id, max_payload=self._max_payload
            )
        except CatgaError as exc:
            self._count_failure(exc, envelope)
            return encode_error(exc, node_id=self.node_id)
        except Exception as exc:  # the result did not serialize
            logger.exception("could not encode the result of %s", _describe(envelope))
            error = RemoteHandlerError(f"result could not be encoded: {exc}", error_type=type(exc).__name__)
            return encode_error(error, node_id=self.node_id)

    def _count_failure(self, exc: CatgaError, envelope: Envelope) -> None:
        if isinstance(exc, RemoteHandlerError):
            self.stats["handler_errors"] += 1
        else:
            self.stats["bad_requests"] += 1
            logger.info("refused %s: %s", _describe(envelope), exc)

    async def _run_event(self, envelope: Envelope) -> None:
        try:
            event = decode_message(envelope, self._dispatcher.types)
        except CatgaError as exc:
            self.stats["bad_events"] += 1
            logger.warning("dropped %s: %s", _describe(envelope), exc)
            return
        if not isinstance(event, Event):
            self.stats["bad_events"] += 1
            logger.warning("dropped %s: not an event", _describe(envelope))
            return
        self.stats["events_handled"] += 1
        self.stats["event_handler_errors"] += await self._dispatcher.handle_event(event)


def _describe(envelope: Envelope) -> str:
    headers = envelope.headers
    return f"{headers.get('catga-type', '?')} {headers.get('catga-id', '?')} from {headers.get(SOURCE, '?')}"
