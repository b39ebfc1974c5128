"""The transport seam: messaging primitives and a membership store, one Protocol each.

Cluster logic (membership, routing, failover) is written once above these; a broker only has to
move envelopes and keep a small key/value table with expiry. Subjects are logical names built by
the cluster layer (``node.<id>``, ``type.<name>``, ``event.<name>``); each transport namespaces
them by cluster name in its own way.

Errors a transport raises are `CatgaError`s: `NoResponderError` when the broker says nobody
listens, `RequestTimeoutError` when no reply came in time, `MessageTooLargeError` over the
broker's payload limit, `TransportError` for anything the broker or the connection did.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from fastapi_catga.core.envelope import Envelope
from fastapi_catga.exceptions import CatgaError
from fastapi_catga.transports.durable import DurableStore

__all__ = [
    "UNSUBSCRIBE_WAIT",
    "ConnectionListener",
    "ConnectionState",
    "Delivery",
    "DeliveryCallback",
    "MemberEvent",
    "MemberWatch",
    "MembershipStore",
    "Subscription",
    "Transport",
    "unsubscribe_all",
]

logger = logging.getLogger(__name__)

Reply = Callable[[Envelope], Awaitable[None]]


@dataclass(slots=True)
class Delivery:
    """One received envelope; ``reply`` answers the requester, and is None for a publish."""

    envelope: Envelope
    reply: Reply | None = None


#: Called once per delivery, on the event loop. It must not block: the cluster layer starts a task.
DeliveryCallback = Callable[[Delivery], None]
#: Called with True when the broker connection is (re)established, False when it is lost.
ConnectionListener = Callable[[bool], None]


@dataclass(eq=False)
class ConnectionState:
    """Whether a transport's connection is up, and who to tell when that changes.

    Each change is told once, in order; a listener that raises is logged and the others still hear.
    Once the transport is closed, nothing more is told: the broker client's late callbacks are moot.
    """

    up: bool = False
    closed: bool = False
    _listeners: list[ConnectionListener] = field(default_factory=list)

    def add(self, listener: ConnectionListener) -> None:
        self._listeners.append(listener)

    def close(self) -> None:
        """Down for good, without telling anyone: whoever closed the transport knows."""
        self.up, self.closed = False, True

    def tell(self, up: bool) -> None:
        if up == self.up or self.closed:
            return
        self.up = up
        for listener in list(self._listeners):
            try:
                listener(up)
            except Exception:
                logger.exception("connection listener %r failed", listener)


class Subscription(Protocol):
    """A live subscription."""

    async def unsubscribe(self) -> None:
        """Stop deliveries; deliveries already handed to the callback are not recalled."""
        ...


#: How long a stopping node waits for the broker to confirm its unsubscribes. Deliveries stop at
#: once either way; the wait only lets peers see "nobody listens" sooner, and a frozen broker must
#: not hold the stop past what docs/deployment.md says.
UNSUBSCRIBE_WAIT = 1.0


async def unsubscribe_all(subscriptions: Iterable[Subscription], *, within: float = UNSUBSCRIBE_WAIT) -> None:
    """Unsubscribe each at once, waiting at most ``within`` seconds in all for the broker's
    confirmations; those still waiting then are cancelled and left to end on their own (their
    errors retrieved). A failure is logged, never raised; a cancelled caller cancels them all."""
    tasks = [asyncio.ensure_future(subscription.unsubscribe()) for subscription in subscriptions]
    if not tasks:
        return
    try:
        _, pending = await asyncio.wait(tasks, timeout=within)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
            task.add_done_callback(_unsubscribed)
    if pending:
        logger.warning(
            "the broker did not confirm %d unsubscribe(s) within %g s; stopping without", len(pending), within
        )


def _unsubscribed(task: asyncio.Future[None]) -> None:
    error = None if task.cancelled() else task.exception()
    if isinstance(error, CatgaError):
        logger.debug("unsubscribe failed: %s", error)
    elif error is not None:  # a bug here or in the client: the stop goes on
        logger.error("unsubscribe failed unexpectedly", exc_info=error)


@dataclass(frozen=True, slots=True)
class MemberEvent:
    """A change in the membership store: a node's record was written, or it went away."""

    kind: Literal["put", "delete"]
    node_id: str
    value: bytes | None = None
    #: A delete that the broker made, the record's TTL having run out (NATS 2.11+ says so), not
    #: the node leaving.
    expired: bool = False


class MemberWatch(Protocol):
    """A stream of `MemberEvent`s; ends (or raises `TransportError`) when the connection breaks."""

    def __aiter__(self) -> AsyncIterator[MemberEvent]: ...

    async def stop(self) -> None:
        """Stop watching and release what the watch holds on the broker."""
        ...


class MembershipStore(Protocol):
    """A node-id -> record table whose records expire ``ttl`` seconds after their last write."""

    async def prepare(self, ttl: float) -> None:
        """Create the bucket/index if missing; idempotent, called again after every reconnect."""
        ...

    async def put(self, node_id: str, value: bytes, ttl: float) -> None:
        """Write (register or heartbeat) a node's record, restarting its expiry."""
        ...

    async def create(self, node_id: str, value: bytes, ttl: float, *, replacing: bytes | None = None) -> bool:
        """Write a node's record only if none is held now, or the one held is ``replacing`` (a stale
        record taken over), atomically; whether it was written."""
        ...

    async def delete(self, node_id: str) -> None:
        """Remove a node's record and tell the watchers at once."""
        ...

    async def list(self) -> dict[str, bytes]:
        """Every unexpired record (an empty store gives an empty dict)."""
        ...

    async def watch(self) -> MemberWatch:
        """Start watching: every put and delete from this call on.

        A watch may begin by repeating current records, and deletes of records already gone;
        both are harmless to a membership that applies events idempotently.
        """
        ...


class Transport(Protocol):
    """Messaging plus a membership store over one broker connection."""

    #: "memory", "nats" or "redis": shown in health answers and logs.
    name: str
    #: The largest envelope this transport sends, in bytes.
    max_payload: int
    #: Whether ``subscribe(..., queue=...)`` load-balances; without it, only direct subjects route.
    supports_queue_groups: bool

    @property
    def bad_frames(self) -> int:
        """Messages received that were no catga frame at all (counted, logged at most once per interval)."""
        ...

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up right now."""
        ...

    @property
    def durable(self) -> DurableStore:
        """Durable queues, leases, done records and dead letters, over the same connection."""
        ...

    @property
    def members(self) -> MembershipStore:
        """The membership store, over the same connection."""
        ...

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        """Call ``listener(False)`` when the connection is lost and ``listener(True)`` once it is back.

        Subscriptions survive a reconnect (the transport restores them before ``listener(True)``):
        subscribing again would deliver every message twice. Watches do not: they end on a loss.
        """
        ...

    async def connect(self) -> None:
        """Connect to the broker.

        Raises:
            TransportError: the broker is unreachable; the message names the URL.
        """
        ...

    async def aclose(self) -> None:
        """Drop every subscription and close the connection; safe to call twice."""
        ...

    async def subscribe(
        self, subject: str, callback: DeliveryCallback, *, queue: str | None = None
    ) -> Subscription:
        """Deliver every envelope sent to ``subject``; with ``queue``, one member of the group each.

        Raises:
            ConfigurationError: ``queue`` given to a transport without queue groups.
            TransportError: the broker is unreachable right now.
        """
        ...

    async def publish(self, subject: str, envelope: Envelope) -> int | None:
        """Send without waiting for handlers. Returns how many received it where the broker says (Redis)."""
        ...

    async def request(self, subject: str, envelope: Envelope, *, timeout: float) -> Envelope:
        """Send to one receiver of ``subject`` and wait up to ``timeout`` seconds for its reply.

        Raises:
            NoResponderError: nobody listens on ``subject``.
            RequestTimeoutError: no reply within ``timeout``.
            TransportError: the connection failed.
        """
        ...
