"""A cluster node: membership, the responder and the sender over one transport, started and
stopped in order."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi_catga.cluster.compat import SchemaCheck
from fastapi_catga.cluster.durable import DurableRunner
from fastapi_catga.cluster.durable_client import DeadLetters, DurableClient, is_durable
from fastapi_catga.cluster.limits import HandlerLimits
from fastapi_catga.cluster.membership import Membership
from fastapi_catga.cluster.responder import Responder, event_subject
from fastapi_catga.cluster.routing import strategy_named
from fastapi_catga.cluster.sender import Sender
from fastapi_catga.cluster.view import ClusterView
from fastapi_catga.core.deadlines import DeadlinePassed
from fastapi_catga.core.dispatch import LocalDispatcher
from fastapi_catga.core.envelope import encode_message, message_room
from fastapi_catga.core.mediator import LocalRoute
from fastapi_catga.core.messages import Accepted, Event, Message, Request
from fastapi_catga.core.nodes import NodeInfo
from fastapi_catga.core.observe import Observer, observed_events
from fastapi_catga.core.schemas import advertised
from fastapi_catga.core.tasks import CANCEL_GRACE, cancel_and_wait
from fastapi_catga.core.travels import as_received, body_of, message_travels, needs_reading, result_check
from fastapi_catga.exceptions import ConfigurationError, MessageValidationError, TransportError
from fastapi_catga.settings import CatgaSettings
from fastapi_catga.transports.base import Transport

__all__ = ["ClusterNode"]

logger = logging.getLogger(__name__)

_RECORD_HEADROOM = 256  # bytes of a membership write that are not the record (KV headers, a key)


class ClusterNode:
    """This process as a member of the cluster.

    Starting it subscribes the handlers, registers the node and fills the view; stopping it
    deregisters first, then drains work in flight, then closes the transport. After that it
    sends nothing more: a call fails at once with `NodeUnavailableError`.

    Args:
        transport: the broker connection (not connected yet).
        dispatcher: this node's handlers.
        settings: node id, timings, routing and limits.
        version: the fastapi-catga version this node advertises.
        clock: monotonic seconds; wall_clock: UNIX seconds (a virtual clock, in simulations).
        observer: told about sends, handler runs, membership and the connection (see `Observer`);
            with one, in-process sends go through the sender too, so that each is seen.
    """

    def __init__(
        self,
        transport: Transport,
        dispatcher: LocalDispatcher,
        settings: CatgaSettings,
        *,
        version: str = "",
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        observer: Observer | None = None,
    ) -> None:
        self.transport = transport
        self.observer = observer
        if observer is not None:
            observer.bind(settings.node_id)
        self.dispatcher = dispatcher
        dispatcher.payload_limit = lambda: transport.max_payload  # the server's, once connected
        self.settings = settings
        self._stopped = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._leaving: asyncio.Future[None] | None = None  # set once stop() begins
        self._stepping_down: asyncio.Task[None] | None = None  # the stop a newer twin caused
        types = [*dispatcher.requests, *dispatcher.registry.events]
        info = NodeInfo(
            node_id=settings.node_id,
            endpoint=settings.endpoint,
            metadata=dict(settings.metadata),
            handles=sorted(t.type_name for t in dispatcher.requests),
            events=sorted(t.type_name for t in dispatcher.registry.events),
            version=version,
            app_version=settings.app_version,
            schemas=advertised(types),
        )
        schemas = SchemaCheck(types)
        self.view = ClusterView(info, settings.node_ttl, on_change=self._update_local_routes, schemas=schemas)
        self.membership = Membership(
            transport,
            self.view,
            heartbeat_interval=settings.heartbeat_interval,
            clock=clock,
            wall_clock=wall_clock,
            observer=observer,
            on_replaced=self._replaced,
            on_hold=self._hold,
        )
        #: Handler slots: every request run here and every event received takes one (not this
        #: node's handlers of an event it publishes, which run in the publisher's task, nor durable
        #: runs, which ``CATGA_DURABLE_CONCURRENCY`` bounds).
        self.limits = HandlerLimits(
            settings.max_in_flight,
            settings.max_in_flight_per_type,
            settings.max_queued_events,
            dispatcher.types.values(),
            node_id=settings.node_id,
            observer=observer,
        )
        self.responder = Responder(
            transport,
            dispatcher,
            max_payload=transport.max_payload,
            limits=self.limits,
            wall_clock=wall_clock,
            observer=observer,
        )
        self._connected = asyncio.Event()
        self.sender = Sender(
            transport,
            dispatcher,
            self.view,
            strategy=strategy_named(settings.routing),
            request_timeout=settings.request_timeout,
            retry_attempts=settings.retry_attempts,
            connected=self._connected,
            clock=clock,
            wall_clock=wall_clock,
            limits=self.limits,
            observer=observer,
        )
        self.durable_runner = DurableRunner(transport, dispatcher, settings, observer=observer)
        self.durable = DurableClient(
            transport,
            settings.node_id,
            clock,
            observer=observer,
            prepare=self.durable_runner.prepare,
            budget=settings.request_timeout,
        )
        #: Request types only this node can run now: the mediator runs their pipeline in the
        #: caller's task, with the same deadline, validation and errors as any other path.
        self.local_routes: dict[type[Message], LocalRoute] = {}
        self._update_local_routes()
        transport.add_connection_listener(self._on_connection)

    @property
    def node_id(self) -> str:
        return self.settings.node_id

    @property
    def request_timeout(self) -> float:
        return self.settings.request_timeout

    @property
    def stopped(self) -> bool:
        """True once `stop` has begun: the node sends nothing more."""
        return self._stopped

    async def start(self) -> None:
        """Connect, subscribe, join.

        Raises:
            TransportError: the broker is unreachable.
            ConfigurationError: a live node already has this node's id, or this node's record
                (its metadata) is more than the broker carries.
        """
        try:
            await self.transport.connect()
            self._check_record()  # against the server's own limit, known once connected
            self._on_connection(self.transport.connected)
            await self.membership.claim()  # before any traffic: a twin of a live node serves nothing
            await self.responder.start()
            await self.durable.start()
            await self.durable_runner.start()
            await self.membership.start()
        except BaseException:  # a node that failed to start is stopped for good, not a zombie
            self._stopped = self.sender.closed = True
            self.local_routes.clear()
            with contextlib.suppress(Exception):
                await self.membership.stop()
            await self.durable_runner.stop(drain_timeout=0)
            await self.responder.stop(drain_timeout=0)
            await self.transport.aclose()
            raise

    def _check_record(self) -> None:
        """Refuse to start with a membership record the broker cannot carry (with room for the
        store's own headers), naming the settings that make it large."""
        record = len(self.view.self_info.model_dump_json().encode())
        if record + _RECORD_HEADROOM > self.transport.max_payload:
            raise ConfigurationError(
                f"node {self.node_id}: its membership record is {record} bytes, more than the broker "
                f"carries ({self.transport.max_payload} bytes): shorten CATGA_METADATA (or "
                "CATGA_ENDPOINT, or register fewer message types on one node)"
            )

    def _hold(self, held: bool) -> None:
        """Frozen past the TTL, or its node id checked again (`Membership.held`): the responder
        holds what it receives meanwhile."""
        self.responder.hold(held)

    def _replaced(self, newer: NodeInfo) -> None:
        """A newer process took this node's id (`Membership.replaced_by`): stop serving now, as a
        stop would (its requests answered, its callers moving on), leaving the record alone."""
        self._stepping_down = asyncio.get_running_loop().create_task(
            self._step_down(), name="catga-step-down"
        )

    async def _step_down(self) -> None:
        try:
            await self.stop()
        except Exception:
            logger.exception("node %s: stepping down failed", self.node_id)

    async def stop(self) -> None:
        """Leave gracefully: deregister, drain work in flight (its handlers may still send), then
        refuse further calls and close the connection. Once only: a second call waits for the first."""
        if self._leaving is not None:
            await asyncio.shield(self._leaving)
            return
        self._leaving = asyncio.get_running_loop().create_future()
        try:
            await self._stop()
        finally:
            self._leaving.set_result(None)

    async def _stop(self) -> None:
        await self.membership.stop()
        await cancel_and_wait(self._tasks, what="node", logger=logger)
        drain = self.settings.drain_timeout
        await asyncio.gather(self.durable_runner.stop(drain), self.responder.stop(drain))
        self._stopped = self.sender.closed = True
        self.local_routes.clear()
        await self.durable.stop()
        try:
            async with asyncio.timeout(2 * CANCEL_GRACE):
                await self.transport.aclose()
        except TimeoutError:
            logger.error(
                "node %s: closing the %s connection took too long; going on",
                self.node_id,
                self.transport.name,
            )
        logger.info("node %s stopped", self.node_id)

    def _on_connection(self, connected: bool) -> None:
        if self.observer is not None and connected != self._connected.is_set():
            self.observer.connection_changed(connected)
        if not connected:
            self._connected.clear()
            return
        self._connected.set()
        if self.durable_runner.queues and not self._stopped and self.membership.joined:
            # The broker may have come back without what it had (no persistence): make it again.
            self._tasks.add(task := asyncio.get_running_loop().create_task(self._prepare_durable()))
            task.add_done_callback(self._tasks.discard)

    async def _prepare_durable(self) -> None:
        try:
            await self.durable_runner.prepare()
        except Exception as exc:
            logger.warning("could not recreate the durable queues after a reconnect (%s); workers retry", exc)

    def _update_local_routes(self) -> None:
        if self._stopped or self.observer is not None:  # observed: every send through the sender
            return
        remote: set[str] = set()
        for node in self.view.nodes()[1:]:
            remote.update(node.handles)
        self.local_routes.clear()
        for message_type in self.dispatcher.requests:
            if message_type.type_name not in remote and not is_durable(message_type):
                self.local_routes[message_type] = self._local_route(message_type)

    def _local_route(self, message_type: type[Message]) -> LocalRoute:
        dispatcher, type_name = self.dispatcher, message_type.type_name
        node_id, max_payload = self.node_id, self.transport.max_payload
        assert issubclass(message_type, Request)
        adapter = message_type.result_adapter()
        return (
            self.limits.within_cap(dispatcher.requests[message_type], type_name),
            type_name,
            dispatcher.exact_results.get(message_type),
            dispatcher.check_of(message_type),
            body_of(message_type),
            message_room(message_type, node_id, max_payload),
            message_travels(message_type, source=node_id, max_payload=max_payload),
            result_check(adapter, node_id=node_id, max_payload=max_payload),
            needs_reading(message_type),
        )

    # -- the mediator's port ----------------------------------------------------------------------

    def send(
        self, message: Request[Any], *, node_id: str | None = None, timeout: float | None = None
    ) -> Awaitable[Any]:
        """Run a command or query on one capable node (see `Sender.send`); a durable one through the
        broker's queue (see `DurableClient.send`). Returns the send to await; what it raises, it
        raises at the call (the mediator awaits at once)."""
        if not isinstance(message, Request):
            raise MessageValidationError(
                f"send() takes a Command or Query, not {type(message).__name__}; publish() events"
            )
        if not is_durable(type(message)):
            return self.sender.send(message, node_id=node_id, timeout=timeout)
        if node_id is not None:
            raise MessageValidationError(
                f"{message.type_name} is durable: any node of its group runs it; send_to_node cannot pick one"
            )
        self.view.learn(type(message))  # as a plain send does: checked, and peers compared with it
        return self.durable.send(message, self.sender.budget(timeout))

    async def enqueue(self, message: Request[Any]) -> Accepted:
        """Store a durable command on the broker and return (see `DurableClient.enqueue`)."""
        if not isinstance(message, Request) or not is_durable(type(message)):
            raise MessageValidationError(
                f"enqueue() takes a durable Command (set durable = True on {type(message).__name__})"
            )
        self.sender.budget(None)
        self.view.learn(type(message))
        return await self.durable.enqueue(message)

    async def broadcast(self, message: Request[Any], *, timeout: float | None = None) -> dict[str, Any]:
        """Run a command or query on every live node.

        Raises:
            MessageValidationError: the type is durable (run at least once by one node of its
                group, once per message id: never on every node).
        """
        if isinstance(message, Request) and is_durable(type(message)):
            raise MessageValidationError(
                f"{message.type_name} is durable: one node of its group runs it, once per message id; "
                "broadcast cannot run it on every node"
            )
        return await self.sender.broadcast(message, timeout=timeout)

    async def publish(self, event: Event) -> None:
        """Run the event's handlers here, and hand it to the broker for every other node.

        Raises:
            TransportError: the broker could not take it within ``CATGA_REQUEST_TIMEOUT`` (the local
                handlers still ran).
        """
        if not isinstance(event, Event):
            raise MessageValidationError(
                f"publish() takes an Event, not {type(event).__name__}; send() requests"
            )
        self.sender.budget(None)
        self.view.learn(type(event))
        if is_durable(type(event)):
            await self.durable.publish(event)  # every handler group runs it from the broker, this node's too
            return
        if self.observer is None:
            await self._publish(event)
            return
        token = self.observer.send_started(event, "publish")
        started = time.perf_counter()
        try:
            await self._publish(event)
        except BaseException as exc:
            self.observer.send_ended(token, event, "publish", time.perf_counter() - started, exc)
            raise
        self.observer.send_ended(token, event, "publish", time.perf_counter() - started, None)

    async def _publish(self, event: Event) -> None:
        # The same rules with or without other nodes: within the payload limit, and read here as
        # they read it (an event their nodes cannot read is refused before anything runs).
        envelope = encode_message(event, source=self.node_id, max_payload=self.transport.max_payload)
        received = as_received(event, envelope.body, self.dispatcher.types)
        failure: TransportError | None = None
        if any(event.type_name in node.events for node in self.view.nodes()[1:]) or self.view.stale:
            if self.observer is not None:
                self.observer.inject(envelope.headers)
            try:  # bounded like a send: a frozen broker must not hold the publisher
                # One timer for every publish, armed about once per timeout (`core.deadlines`):
                # the broker client takes most messages without suspending.
                publish = self.transport.publish(event_subject(event.type_name), envelope)
                await self.dispatcher.deadlines.run(publish, self.settings.request_timeout, keep_late=True)
            except TransportError as exc:
                failure = exc
            except (TimeoutError, DeadlinePassed):
                # Sent or not, nobody can tell: a frozen server may still deliver it when it resumes.
                failure = TransportError(
                    f"the broker did not confirm {event.type_name} {event.message_id} within "
                    f"{self.settings.request_timeout:g} s; it may still be delivered (publishing it "
                    "again may deliver it twice)"
                )
        if self.dispatcher.handles(type(received)):
            if self.observer is None:
                await self.dispatcher.handle_event(received)
            else:  # in the publisher's context, as an attempt routed to this node
                run = functools.partial(self.dispatcher.handle_event, received)
                await observed_events(self.observer, event, {}, run)
        if failure is not None:
            raise failure

    @property
    def dead_letters(self) -> DeadLetters:
        """The dead-letter store on the broker."""
        return self.durable.dead_letters

    def nodes(self) -> list[NodeInfo]:
        """The live nodes, this one first."""
        return self.view.nodes()

    def current(self) -> NodeInfo:
        """This node."""
        return self.view.self_info

    def health(self) -> dict[str, Any]:
        """Transport and membership state, for ``/catga/health``."""
        healthy = self.transport.connected and not self.view.stale and not self._stopped
        newer = self.membership.replaced_by
        return {
            "status": "ok" if healthy else "replaced" if newer is not None else "unavailable",
            "transport": self.transport.name,
            "connected": self.transport.connected,
            "node_id": self.node_id,
            "members": len(self.view.nodes()),
            "view_stale": self.view.stale,
            # A newer process with this node id took over: this one serves nothing more.
            "replaced_by": None
            if newer is None
            else {"incarnation": newer.incarnation, "started_at": newer.started_at.isoformat()},
            "stats": {
                **self.responder.stats,
                **self.limits.stats,
                "in_flight": self.limits.in_flight,
                "events_waiting": self.limits.events_waiting,
                "bad_frames": self.transport.bad_frames,
            },
        }
