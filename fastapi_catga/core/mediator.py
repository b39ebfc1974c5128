"""The `Mediator`: what routes receive to send commands and queries and publish events."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from fastapi_catga.core.dispatch import LocalDispatcher, handler_error
from fastapi_catga.core.messages import Event, Message, Request
from fastapi_catga.core.nodes import NodeInfo
from fastapi_catga.exceptions import CatgaError

__all__ = ["ClusterPort", "Mediator"]

R = TypeVar("R")


class ClusterPort(Protocol):
    """What the mediator needs from the cluster layer (implemented by `ClusterNode`)."""

    local_routes: dict[type[Message], Callable[[Any], Awaitable[Any]]]

    async def send(
        self, message: Request[Any], *, node_id: str | None = None, timeout: float | None = None
    ) -> Any: ...

    async def publish(self, event: Event) -> None: ...

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

    async def send(self, message: Request[R], *, timeout: float | None = None) -> R:
        """Run a command or query on one capable node anywhere in the cluster and return its result.

        A failed attempt (nobody listening, node gone, attempt timeout) is retried on another node,
        up to ``CATGA_RETRY_ATTEMPTS`` attempts within ``timeout`` (default ``CATGA_REQUEST_TIMEOUT``).
        When only this node can run the message, it runs in the caller's task at the cost of a
        plain call, bounded only when ``timeout`` is given.

        Raises:
            HandlerNotFoundError: no live node handles this type.
            NodeUnavailableError: capable nodes exist but none could take it.
            RequestTimeoutError: no answer before the deadline.
            RemoteHandlerError: the handler raised (``error_type`` names the exception).
            MessageTooLargeError: over the payload limit; nothing was sent.
            CatgaError: any `CatgaError` the handler raised, as its own class.
        """
        run = self._local.get(message.__class__)
        if run is None or timeout is not None:
            result: R = await self._cluster.send(message, timeout=timeout)
            return result
        try:
            result = await run(message)
        except Exception as exc:
            error = handler_error(exc, message, self._dispatcher.node_id)
            if error is exc:
                raise
            raise error from exc
        return result

    async def send_to_node(self, message: Request[R], node_id: str, *, timeout: float | None = None) -> R:
        """Run a command or query on the named node only (no failover).

        Raises:
            NodeUnavailableError: the node is unknown, dead, or not listening.
            HandlerNotFoundError: the node has no handler for this type.
        """
        result: R = await self._cluster.send(message, node_id=node_id, timeout=timeout)
        return result

    async def publish(self, event: Event) -> None:
        """Run every handler of the event, on this node (awaited) and on every other live node.

        Delivery to other nodes is at-most-once: a node that is disconnected at that moment misses it.
        A failing handler is logged and does not stop the others.
        """
        await self._cluster.publish(event)

    async def broadcast(
        self, message: Request[R], *, timeout: float | None = None
    ) -> dict[str, R | CatgaError]:
        """Run a command or query on every live node; one entry per node id: its result or its error."""
        return await self._cluster.broadcast(message, timeout=timeout)

    async def get_nodes(self) -> list[NodeInfo]:
        """The live nodes, this one first."""
        return self._cluster.nodes()

    async def get_current_node(self) -> NodeInfo:
        """This node."""
        return self._cluster.current()
