"""A cluster node: the sending side of the mediator (routing, retry, failover) plus its parts."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi_catga.cluster.membership import Membership
from fastapi_catga.cluster.responder import Responder, event_subject, node_subject, type_subject
from fastapi_catga.cluster.routing import RoutingName, choose_node, strategy_named
from fastapi_catga.cluster.view import ClusterView
from fastapi_catga.core.dispatch import LocalDispatcher, Pipeline
from fastapi_catga.core.envelope import (
    ATTEMPT,
    DEADLINE,
    Envelope,
    deadline_header,
    decode_reply,
    encode_message,
)
from fastapi_catga.core.messages import Event, Message, Request
from fastapi_catga.core.nodes import NodeInfo
from fastapi_catga.exceptions import (
    CatgaError,
    HandlerNotFoundError,
    MessageValidationError,
    NodeUnavailableError,
    NoResponderError,
    RequestTimeoutError,
    TransportError,
)
from fastapi_catga.transports.base import Transport

__all__ = ["ClusterConfig", "ClusterNode"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """How a node behaves in the cluster; `CatgaSettings` fills it from ``CATGA_*`` variables."""

    node_id: str
    endpoint: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    heartbeat_interval: float = 5.0
    node_ttl: float = 15.0
    request_timeout: float = 30.0
    retry_attempts: int = 3
    routing: RoutingName = "round_robin"
    drain_timeout: float = 10.0
    version: str = ""


class ClusterNode:
    """This process as a member of the cluster.

    Starting it subscribes the handlers, registers the node and fills the view; stopping it
    deregisters first, then drains work in flight, then closes the transport.
    """

    def __init__(
        self,
        transport: Transport,
        dispatcher: LocalDispatcher,
        config: ClusterConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.transport = transport
        self.dispatcher = dispatcher
        self.config = config
        info = NodeInfo(
            node_id=config.node_id,
            endpoint=config.endpoint,
            metadata=dict(config.metadata),
            handles=sorted(t.type_name for t in dispatcher.requests),
            events=sorted(t.type_name for t in dispatcher.registry.events),
            version=config.version,
        )
        self.view = ClusterView(info, config.node_ttl, on_change=self._update_local_routes)
        self.membership = Membership(
            transport, self.view, heartbeat_interval=config.heartbeat_interval, clock=clock
        )
        self.responder = Responder(
            transport, dispatcher, max_payload=transport.max_payload, wall_clock=wall_clock
        )
        self._strategy = strategy_named(config.routing)
        self._clock = clock
        self._wall_clock = wall_clock
        #: Request types only this node can run now: the mediator calls their pipeline directly.
        self.local_routes: dict[type[Message], Pipeline] = {}
        self._update_local_routes()
        self._connected = asyncio.Event()
        transport.add_connection_listener(self._on_connection)

    @property
    def node_id(self) -> str:
        return self.config.node_id

    async def start(self) -> None:
        """Connect, subscribe, join. Raises `TransportError` when the broker is unreachable."""
        await self.transport.connect()
        self._on_connection(self.transport.connected)
        try:
            await self.responder.start()
            await self.membership.start()
        except BaseException:
            await self.responder.stop(drain_timeout=0)
            await self.transport.aclose()
            raise

    async def stop(self) -> None:
        """Leave gracefully: deregister, drain work in flight, close the connection."""
        await self.membership.stop()
        await self.responder.stop(self.config.drain_timeout)
        await self.transport.aclose()
        logger.info("node %s stopped", self.node_id)

    def _update_local_routes(self) -> None:
        remote: set[str] = set()
        if self.config.routing != "local_first":
            for node in self.view.nodes()[1:]:
                remote.update(node.handles)
        self.local_routes.clear()
        for message_type, pipeline in self.dispatcher.requests.items():
            if message_type.type_name not in remote:
                self.local_routes[message_type] = pipeline

    # -- sending -----------------------------------------------------------------------------------

    async def send(
        self, message: Request[Any], *, node_id: str | None = None, timeout: float | None = None
    ) -> Any:
        """Run a command or query on one capable node, retrying on another within the deadline."""
        if not isinstance(message, Request):
            raise MessageValidationError(
                f"send() takes a Command or Query, not {type(message).__name__}; publish() events"
            )
        budget = self.config.request_timeout if timeout is None else timeout
        if budget <= 0:
            raise ValueError(f"timeout must be positive, got {budget}")
        call = _Call(message, self._clock() + budget, budget)
        if node_id is not None:
            return await self._send_to(call, node_id)
        return await self._send_any(call)

    async def _send_to(self, call: _Call, node_id: str) -> Any:
        node = self.view.get(node_id)
        if node is None:
            known = ", ".join(n.node_id for n in self.view.nodes())
            raise NodeUnavailableError(f"node {node_id!r} is unknown or dead; live nodes: {known}")
        if call.message.type_name not in node.handles:
            raise HandlerNotFoundError(f"node {node_id} has no handler for {call.message.type_name}")
        try:
            return await self._patient_attempt(call, node_id, 1, math.inf)
        except NoResponderError as exc:
            self.view.suspect(node_id, self._clock())
            raise NodeUnavailableError(f"node {node_id} is not listening (stopped or crashed)") from exc

    async def _send_any(self, call: _Call) -> Any:
        attempts = self.config.retry_attempts
        tried: set[str] = set()
        for attempt in range(1, attempts + 1):
            remaining = call.deadline - self._clock()
            target = self._pick(call.message, tried)
            if remaining <= 0 or target is None:
                break
            # Each attempt gets its share of the time left, so one dead or paused node cannot eat the
            # whole budget; with no other node left to try, a retry would only run a slow handler
            # again, so the last candidate gets all of it.
            share = remaining / max(1, min(attempts - attempt + 1, self._untried(call.message, tried)))
            try:
                return await self._patient_attempt(call, target, attempt, share)
            except CatgaError as exc:
                call.errors.append(exc)
                if not self._may_retry(exc, target):
                    raise
                tried.add(target)
                await self._backoff(exc, call.deadline)
        raise self._final_error(call)

    async def _patient_attempt(self, call: _Call, target: str, attempt: int, share: float) -> Any:
        """Run an attempt; when the broker connection is down, wait for it (up to the deadline) and
        run it again. No node is to blame for that, so it costs no attempt and marks no suspect."""
        while True:
            try:
                return await self._attempt(call, target, attempt, min(share, call.deadline - self._clock()))
            except TransportError as exc:
                if isinstance(exc, NoResponderError) or not await self._broker_back(call.deadline):
                    raise

    async def _broker_back(self, deadline: float) -> bool:
        await asyncio.sleep(0.05)  # at least a pause: a broker refusing while "connected" must not spin us
        try:
            async with asyncio.timeout(max(0.0, deadline - self._clock())):
                await self._connected.wait()
        except TimeoutError:
            return False
        return self._clock() < deadline - 0.01

    def _on_connection(self, connected: bool) -> None:
        if connected:
            self._connected.set()
        else:
            self._connected.clear()

    def _pick(self, message: Request[Any], tried: set[str]) -> str | None:
        candidates = self.view.capable(message.type_name)
        fresh = [n for n in candidates if n.node_id not in tried and not self.view.is_suspect(n.node_id)]
        pool = fresh or [n for n in candidates if n.node_id not in tried] or candidates
        if pool:
            return choose_node(self._strategy, pool, message, self.node_id).node_id
        if self.transport.supports_queue_groups and not tried:
            return ""  # nobody known: let the broker pick from the type's queue group
        return None

    def _untried(self, message: Request[Any], tried: set[str]) -> int:
        return sum(1 for node in self.view.capable(message.type_name) if node.node_id not in tried)

    def _may_retry(self, exc: CatgaError, target: str) -> bool:
        if isinstance(exc, NoResponderError | RequestTimeoutError):
            self.view.suspect(target, self._clock())
            return True
        return isinstance(exc, HandlerNotFoundError) or exc.retryable

    async def _backoff(self, exc: CatgaError, deadline: float) -> None:
        if isinstance(exc, NoResponderError | HandlerNotFoundError):
            return  # the broker (or the node) answered at once: switch now
        delay = min(random.uniform(0.05, 0.2), max(0.0, deadline - self._clock()))
        await asyncio.sleep(delay)

    def _final_error(self, call: _Call) -> CatgaError:
        what = f"{call.message.type_name} {call.message.message_id}"
        last = call.errors[-1] if call.errors else None
        if last is None:
            return HandlerNotFoundError(f"no live node handles {call.message.type_name}")
        if isinstance(last, NoResponderError) and not last.node_id and len(call.errors) == 1:
            return HandlerNotFoundError(f"no node in the cluster handles {call.message.type_name}")
        if isinstance(last, TransportError) and not isinstance(last, NoResponderError):
            return last  # the broker stayed unreachable until the deadline
        if isinstance(last, RequestTimeoutError) or self._clock() >= call.deadline:
            error: CatgaError = RequestTimeoutError(
                f"{what}: no answer within {call.budget:g} s ({len(call.errors)} attempt(s))"
            )
        elif isinstance(last, NoResponderError | HandlerNotFoundError):
            error = NodeUnavailableError(
                f"{what}: no live node could take it ({len(call.errors)} attempt(s))"
            )
        else:
            return last
        error.__cause__ = last
        return error

    async def _attempt(self, call: _Call, target: str, attempt: int, timeout: float) -> Any:
        if target == self.node_id:
            try:
                async with asyncio.timeout(timeout):
                    return await self.dispatcher.handle_request(call.message)
            except TimeoutError as exc:
                if isinstance(exc, CatgaError):
                    raise
                raise RequestTimeoutError(f"{call.message.type_name} ran over {timeout:.3f} s here") from None
        envelope = call.envelope(self.node_id, self.transport.max_payload)
        headers = {
            **envelope.headers,
            ATTEMPT: str(attempt),
            DEADLINE: deadline_header(self._wall_clock() + timeout),
        }
        subject = node_subject(target) if target else type_subject(call.message.type_name)
        try:
            reply = await self.transport.request(subject, Envelope(headers, envelope.body), timeout=timeout)
        except (NoResponderError, RequestTimeoutError) as exc:
            exc.node_id = target or None
            raise
        return decode_reply(reply, type(call.message).result_adapter())

    async def broadcast(self, message: Request[Any], *, timeout: float | None = None) -> dict[str, Any]:
        """Send to every live node at once; one entry per node, a result or a `CatgaError`."""
        if not isinstance(message, Request):
            raise MessageValidationError(
                f"broadcast() takes a Command or Query, not {type(message).__name__}"
            )
        budget = self.config.request_timeout if timeout is None else timeout
        call = _Call(message, self._clock() + budget, budget)
        nodes = self.view.nodes()

        async def one(node: NodeInfo) -> Any:
            try:
                return await self._send_to(call, node.node_id)
            except CatgaError as exc:
                return exc

        results = await asyncio.gather(*(one(node) for node in nodes))
        return {node.node_id: result for node, result in zip(nodes, results, strict=True)}

    async def publish(self, event: Event) -> None:
        """Run the event's handlers here, and hand it to the broker for every other node.

        Raises:
            TransportError: the broker could not take it (the local handlers still ran).
        """
        if not isinstance(event, Event):
            raise MessageValidationError(
                f"publish() takes an Event, not {type(event).__name__}; send() requests"
            )
        failure: TransportError | None = None
        if any(event.type_name in node.events for node in self.view.nodes()[1:]) or self.view.stale:
            envelope = encode_message(event, source=self.node_id, max_payload=self.transport.max_payload)
            try:
                await self.transport.publish(event_subject(event.type_name), envelope)
            except TransportError as exc:
                failure = exc
        if self.dispatcher.handles(type(event)):
            await self.dispatcher.handle_event(event)
        if failure is not None:
            raise failure

    def nodes(self) -> list[NodeInfo]:
        """The live nodes, this one first."""
        return self.view.nodes()

    def current(self) -> NodeInfo:
        """This node."""
        return self.view.self_info

    def health(self) -> dict[str, Any]:
        """Transport and membership state, for ``/catga/health``."""
        healthy = self.transport.connected and not self.view.stale
        return {
            "status": "ok" if healthy else "unavailable",
            "transport": self.transport.name,
            "connected": self.transport.connected,
            "node_id": self.node_id,
            "members": len(self.view.nodes()),
            "view_stale": self.view.stale,
            "stats": dict(self.responder.stats),
        }


class _Call:
    """One ``send``: the message, its deadline, what went wrong so far, its envelope once encoded."""

    __slots__ = ("_envelope", "budget", "deadline", "errors", "message")

    def __init__(self, message: Request[Any], deadline: float, budget: float) -> None:
        self.message = message
        self.deadline = deadline
        self.budget = budget
        self.errors: list[CatgaError] = []
        self._envelope: Envelope | None = None

    def envelope(self, source: str, max_payload: int) -> Envelope:
        if self._envelope is None:
            self._envelope = encode_message(self.message, source=source, max_payload=max_payload)
        return self._envelope
