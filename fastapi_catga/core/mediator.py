"""The `Mediator`: what routes receive to send commands and queries and publish events."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sized
from typing import Any, Protocol, TypeVar

from pydantic_core import PydanticSerializationError

from fastapi_catga.core.dead_letter import DeadLetter
from fastapi_catga.core.dispatch import LocalDispatcher
from fastapi_catga.core.envelope import budget_of, unencodable
from fastapi_catga.core.messages import Accepted, Event, Message, Request
from fastapi_catga.core.nodes import NodeInfo
from fastapi_catga.core.pipeline import Pipeline
from fastapi_catga.core.raised import is_handler_error
from fastapi_catga.exceptions import BusyError, CatgaError, MessageValidationError, RequestTimeoutError

__all__ = ["ClusterPort", "DeadLetterStore", "HandlerSlots", "LocalRoute", "Mediator"]

R = TypeVar("R")


class DeadLetterStore(Protocol):
    """What ``mediator.dead_letters`` offers (implemented by `cluster.durable_client.DeadLetters`)."""

    async def list(self, limit: int = 100) -> list[DeadLetter]: ...

    async def get(self, letter_id: str) -> DeadLetter | None: ...

    async def replay(self, letter_id: str) -> bool: ...

    async def discard(self, letter_id: str) -> bool: ...


class HandlerSlots(Protocol):
    """The node's limit of handler runs at once (implemented by `cluster.limits.HandlerLimits`)."""

    in_flight: int

    @property
    def limit(self) -> int: ...

    @property
    def ready(self) -> Sized: ...

    def refused(self, type_name: str) -> BusyError: ...

    def start_waiting(self) -> None: ...


#: A request type run in-process: its pipeline (within the type's own cap, if any: see
#: `HandlerLimits.within_cap`), its type name, the class its results pass unchecked as
#: (`LocalDispatcher.exact_results`), the check of other results (`LocalDispatcher.check_of`);
#: then what holds a run here to what travels, raising what a run on another node would: the
#: type's JSON serializer, the body size under which a message surely fits
#: (`envelope.message_room`), the message as another node reads it when it is larger or of a type
#: JSON may change (`travels.message_travels`), the check of a (checked) result, which returns it
#: as it would arrive from there (`travels.result_check`), and whether a message must be read
#: back so (`travels.needs_reading`: of such a type, or holding what validation would refuse).
LocalRoute = tuple[
    Pipeline,
    str,
    type | None,
    Callable[[Request[Any], Any], Any],
    Callable[[Request[Any]], bytes],
    int,
    Callable[[Request[Any], bytes], Any],
    Callable[[Request[Any], Any], Any],
    Callable[[Request[Any]], bool],
]


class ClusterPort(Protocol):
    """What the mediator needs from the cluster layer (implemented by `ClusterNode`)."""

    #: The request types only this node runs (sent in-process).
    local_routes: dict[type[Message], LocalRoute]

    @property
    def limits(self) -> HandlerSlots: ...

    @property
    def request_timeout(self) -> float: ...

    def send(
        self, message: Request[Any], *, node_id: str | None = None, timeout: float | None = None
    ) -> Awaitable[Any]: ...

    async def publish(self, event: Event) -> None: ...

    async def enqueue(self, message: Request[Any]) -> Accepted: ...

    @property
    def dead_letters(self) -> DeadLetterStore: ...

    async def broadcast(self, message: Request[Any], *, timeout: float | None = None) -> dict[str, Any]: ...

    def nodes(self) -> list[NodeInfo]: ...

    def current(self) -> NodeInfo: ...


class Mediator:
    """Sends commands and queries to one capable node, publishes events to all of them.

    Get it in a route with ``mediator: Mediator = Depends(get_mediator)``.
    """

    def __init__(self, dispatcher: LocalDispatcher, cluster: ClusterPort) -> None:
        self._dispatcher = dispatcher
        self._cluster = cluster
        self._local = cluster.local_routes  # kept current by the cluster as nodes come and go
        self._slots = cluster.limits
        self._deadlines = dispatcher.deadlines
        self._timeout = cluster.request_timeout

    async def send(self, message: Request[R], *, timeout: float | None = None) -> R:
        """Run a command or query on one capable node anywhere in the cluster and return its result.

        A failed attempt (nobody listening, node gone, attempt timeout) is retried on another node,
        up to ``CATGA_RETRY_ATTEMPTS`` attempts within ``timeout`` (default ``CATGA_REQUEST_TIMEOUT``).
        An error the handler raised is returned once, not retried, unless it is a `RetryableError`.
        When only this node can run the message, it runs in the caller's task at the cost of a
        plain call, under the same deadline, result validation and error rules.

        Raises:
            HandlerNotFoundError: no live node handles this type.
            NodeUnavailableError: capable nodes exist but none could take it.
            RequestTimeoutError: no answer before the deadline.
            RemoteHandlerError: the handler raised (``error_type`` names the exception; its text
                stays in the handling node's log), or returned a result of the wrong type.
            MessageTooLargeError: over the payload limit; nothing was sent.
            MessageValidationError: the message does not read back from its JSON as its type (a
                NaN in a float field), or ``timeout`` is no positive number of seconds up to 1e9;
                nothing ran, here or elsewhere.
            ConfigurationError: the type's ``type_name`` is none a handler could register.
            CatgaError: any `CatgaError` the handler raised, as its own class.
        """
        route = self._local.get(type(message))
        if route is None:
            result: R = await self._cluster.send(message, timeout=timeout)
            return result
        # The hot path of an in-process send, written inline (each call or attribute costs on
        # every send): the pipeline awaited in the caller's task, its deadline kept by
        # `Deadlines` (no timer per call), a slot of the node's limit taken as a remote run takes it.
        budget = self._timeout if timeout is None else budget_of(timeout)
        slots, deadlines = self._slots, self._deadlines
        if slots.in_flight >= slots.limit:
            raise slots.refused(route[1])
        try:
            body = route[4](message)  # near the payload limit, or of a type that JSON may change:
        except PydanticSerializationError as exc:
            raise unencodable(message, exc) from exc
        if route[8](message) or len(body) + 6 * len(message.message_id) > route[5]:
            message = route[6](message, body)  # as another node would read it, if it fits
        coro = route[0](message)  # an async def's call: it only makes the coroutine
        deadline = deadlines.clock() + budget
        if deadlines.current is not None:
            deadlines.park()
        deadlines.current, deadlines.current_deadline = coro, deadline
        if deadline < deadlines.timer_at:
            deadlines.arm(deadline)
        slots.in_flight += 1
        late = False
        try:
            result = await coro
        except BaseException as exc:
            raise self._error_of(exc, coro, message, budget)  # noqa: B904 (its cause is set there)
        finally:
            slots.in_flight -= 1
            if deadlines.current is coro:
                deadlines.current = None
            else:
                late = deadlines.ended(coro)
            if slots.ready:
                slots.start_waiting()
        if late or deadlines.clock() > deadline:  # it swallowed the cancellation, or never suspended
            raise _timed_out(message, budget)  # past its deadline: a caller elsewhere has moved on
        if type(result) is not route[2]:
            result = route[3](message, result)
        checked: R = route[7](message, result)
        return checked

    def _error_of(
        self, exc: BaseException, coro: Coroutine[Any, Any, Any], message: Request[Any], budget: float
    ) -> BaseException:
        """What an in-process send raises when its run raised ``exc``: the handler's errors as
        `LocalDispatcher.run_request` makes them, its deadline as `RequestTimeoutError`, and
        anything else (the caller's own cancellation, a process exit) as it is."""
        if isinstance(exc, asyncio.CancelledError) and self._deadlines.timed_out(coro):
            error: BaseException = _timed_out(message, budget)
            error.__suppress_context__ = True
            return error
        if not is_handler_error(exc):
            return exc
        error = self._dispatcher.handler_error(exc, message)
        error.__cause__ = exc
        return error

    async def enqueue(self, message: Request[Any]) -> Accepted:
        """Store a durable command on the broker and return as soon as the broker has it (the HTTP 202
        pattern); a node of its group runs it, at least once, until one run succeeds.

        Raises:
            MessageValidationError: the type is not durable (set ``durable = True`` on it).
            TransportError: the broker did not confirm it (it may or may not be stored: enqueue
                the same message, with the same ``message_id``, again).
        """
        return await self._cluster.enqueue(message)

    @property
    def dead_letters(self) -> DeadLetterStore:
        """Durable messages that will not run until replayed: ``list()``, ``get(id)``,
        ``replay(id)``, ``discard(id)``."""
        return self._cluster.dead_letters

    async def send_to_node(self, message: Request[R], node_id: str, *, timeout: float | None = None) -> R:
        """Run a command or query on the named node only (no failover).

        Raises:
            NodeUnavailableError: the node is unknown, dead, or not listening.
            HandlerNotFoundError: the node has no handler for this type.
            MessageValidationError: ``node_id`` is no node id (not a non-empty str); nothing was sent.
        """
        if type(node_id) is not str or not node_id:  # None would mean "any node" further down
            raise MessageValidationError(f"send_to_node() takes a node id (a non-empty str), not {node_id!r}")
        result: R = await self._cluster.send(message, node_id=node_id, timeout=timeout)
        return result

    async def publish(self, event: Event) -> None:
        """Run every handler of the event, on this node (awaited) and on every other live node.

        Delivery to other nodes is at-most-once: a node that is disconnected at that moment misses it.
        A failing handler is logged and does not stop the others. A durable event instead returns
        once the broker stored it; each handler then runs it at least once, on one node of those
        that have it (this one's handlers too, never inline).
        """
        await self._cluster.publish(event)

    async def broadcast(
        self, message: Request[R], *, timeout: float | None = None
    ) -> dict[str, R | CatgaError]:
        """Run a command or query on every live node; one entry per node id: its result or its error.

        Raises:
            MessageValidationError: the type is durable (one node of its group runs it, once per
                message id); nothing ran.
        """
        return await self._cluster.broadcast(message, timeout=timeout)

    async def get_nodes(self) -> list[NodeInfo]:
        """The live nodes, this one first."""
        return self._cluster.nodes()

    async def get_current_node(self) -> NodeInfo:
        """This node."""
        return self._cluster.current()


def _timed_out(message: Request[Any], budget: float) -> RequestTimeoutError:
    # In the words of a send through the cluster (`attempts.final_error`): a run here is one attempt.
    what = f"{message.type_name} {message.message_id}"
    return RequestTimeoutError(f"{what}: no answer within {budget:g} s (1 attempt(s))")
