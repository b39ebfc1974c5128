"""The embedded in-memory transport: the default, and the test harness for whole clusters.

One `InMemoryBroker` stands for a broker; every `InMemoryTransport` attached to it is one node's
connection. Several nodes in one process sharing a broker form a real cluster, with the same
membership, routing and failover code that runs over NATS or Redis::

    broker = InMemoryBroker()
    node_a = InMemoryTransport(broker)
    node_b = InMemoryTransport(broker)

Faults are one call away: `InMemoryTransport.crash` (a ``kill -9``: subscriptions vanish, the
membership record stays until it expires), `InMemoryTransport.pause` / `resume` (a SIGSTOP:
deliveries wait, then run late), `InMemoryBroker.outage` (the broker goes away and comes back)
and `InMemoryBroker.freeze` / `thaw` (a SIGSTOPped broker: connected, but silent).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi_catga.core.envelope import DEFAULT_MAX_PAYLOAD, Envelope
from fastapi_catga.exceptions import (
    MessageTooLargeError,
    NoResponderError,
    RequestTimeoutError,
    TransportError,
)
from fastapi_catga.transports.base import (
    ConnectionListener,
    ConnectionState,
    Delivery,
    DeliveryCallback,
)
from fastapi_catga.transports.memory_durable import MemoryDurable, MemoryDurableStore
from fastapi_catga.transports.memory_members import MemberTable, MemoryMembers

__all__ = ["InMemoryBroker", "InMemoryTransport"]


@dataclass(eq=False)
class _Sub:
    transport: InMemoryTransport
    subject: str
    callback: DeliveryCallback
    queue: str | None

    async def unsubscribe(self) -> None:
        self.transport.broker._remove(self)


class InMemoryBroker:
    """A broker in this process: subjects, queue groups and a membership table with expiry.

    Args:
        clock: monotonic seconds, for record expiry; inject one to test expiry without sleeping.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.up = True
        self._subs: dict[str, list[_Sub]] = {}
        self._rotation = itertools.count()
        self.members = MemberTable(clock)
        # A dict, not a set: connections are told in the order they came, so a seeded simulation
        # on a virtual clock replays exactly (a set of objects iterates by address).
        self._transports: dict[InMemoryTransport, None] = {}
        self._thawed: asyncio.Event | None = None  # an event while frozen, set at the thaw
        self.durable = MemoryDurable(clock)

    @property
    def frozen(self) -> bool:
        return self._thawed is not None

    def freeze(self) -> None:
        """Freeze like a SIGSTOPped broker: connections stay up, but every membership call, publish,
        request and reply waits until `thaw` (a request's timeout still runs). Nothing reaches a
        watcher meanwhile, since every write waits."""
        if self._thawed is None:
            self._thawed = asyncio.Event()

    def thaw(self) -> None:
        """Resume after `freeze`: the calls and replies held meanwhile go through now, late."""
        thawed, self._thawed = self._thawed, None
        if thawed is not None:
            thawed.set()

    async def _unfrozen(self) -> None:
        while self._thawed is not None:
            await self._thawed.wait()

    def outage(self) -> None:
        """Take the broker down: every connected transport loses its connection; records stay."""
        self.thaw()  # a frozen broker that dies: what it held fails now (the connections are down)
        self.up = False
        for transport in list(self._transports):
            transport._set_connected(False)
        self.members.end_watches()

    def restore(self) -> None:
        """Bring the broker back; transports reconnect (their subscriptions survive, as in nats-py)."""
        self.up = True
        for transport in list(self._transports):
            if not transport.crashed and not transport.closed:
                transport._set_connected(True)

    # -- messaging ------------------------------------------------------------------------------

    def _remove(self, sub: _Sub) -> None:
        subs = self._subs.get(sub.subject, [])
        if sub in subs:
            subs.remove(sub)

    def _receivers(self, subject: str) -> list[_Sub]:
        receivers: list[_Sub] = []
        groups: dict[str, list[_Sub]] = {}
        for sub in self._subs.get(subject, ()):
            if sub.queue is None:
                receivers.append(sub)
            else:
                groups.setdefault(sub.queue, []).append(sub)
        for members in groups.values():
            receivers.append(members[next(self._rotation) % len(members)])
        return receivers


class InMemoryTransport:
    """One node's connection to an `InMemoryBroker` (a private one when none is given).

    Envelopes are handed over as they are, without a socket, but every other rule of a real
    broker holds: nobody listening is `NoResponderError`, a late reply is `RequestTimeoutError`,
    an oversize envelope is `MessageTooLargeError`, a lost broker is `TransportError`.
    """

    name = "memory"
    supports_queue_groups = True

    def __init__(
        self,
        broker: InMemoryBroker | None = None,
        *,
        cluster: str = "catga",
        max_payload: int = DEFAULT_MAX_PAYLOAD,
    ) -> None:
        self.broker = broker or InMemoryBroker()
        self.cluster = cluster
        self.max_payload = max_payload
        self.crashed = False
        self.closed = False
        self._state = ConnectionState()
        self._paused: asyncio.Event | None = None
        self._members = MemoryMembers(self.broker.members, cluster, self._reachable)
        self._durable = MemoryDurableStore(self.broker.durable, cluster, self._reachable)
        self._tasks: set[asyncio.Task[Any]] = set()
        # What deliveries run in: the context of the transport's connect(), as a NATS or Redis
        # reader task's is; never the sender's (a caller's context variables reach no other node).
        self._context = contextvars.copy_context()

    #: Envelopes are handed over as objects here: there are no frames to be unreadable.
    bad_frames = 0

    @property
    def connected(self) -> bool:
        return self._state.up

    @property
    def durable(self) -> MemoryDurableStore:
        """Durable queues, leases, done records and dead letters, kept by the broker object."""
        return self._durable

    @property
    def members(self) -> MemoryMembers:
        return self._members

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        self._state.add(listener)

    def _set_connected(self, connected: bool) -> None:
        self._state.tell(connected)

    def _check(self) -> None:
        if not self._state.up:
            raise TransportError(f"in-memory broker unreachable (cluster {self.cluster!r})")

    async def _reachable(self) -> None:
        """`_check`, waiting first while the broker is frozen."""
        self._check()
        if self.broker.frozen:
            await self.broker._unfrozen()
            self._check()

    async def connect(self) -> None:
        """Connect; again after `aclose` too (an app's lifespan that runs again, for another test
        client, with the transport it was given), not after `crash`."""
        if self.crashed:
            raise TransportError("this transport crashed; create a new one")
        if not self.broker.up:
            raise TransportError("in-memory broker is down")
        self.closed = False
        self._context = contextvars.copy_context()
        self.broker._transports[self] = None
        self._set_connected(True)

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._drop()
        self._state = ConnectionState()  # down, and deaf to the node that used it

    def crash(self) -> None:
        """Die like ``kill -9``: subscriptions vanish at once, the membership record stays."""
        self.crashed = True
        self._drop()
        self._state.up = False
        for task in self._tasks:
            task.cancel()

    def pause(self) -> None:
        """Freeze like SIGSTOP: deliveries to this node wait until `resume`."""
        if self._paused is None:
            self._paused = asyncio.Event()

    def resume(self) -> None:
        """Thaw after `pause`: held deliveries run now, late."""
        if self._paused is not None:
            self._paused.set()
            self._paused = None

    def _drop(self) -> None:
        self.broker._transports.pop(self, None)
        for subs in self.broker._subs.values():
            subs[:] = [sub for sub in subs if sub.transport is not self]

    async def subscribe(self, subject: str, callback: DeliveryCallback, *, queue: str | None = None) -> _Sub:
        self._check()
        sub = _Sub(self, subject, callback, queue)
        self.broker._subs.setdefault(subject, []).append(sub)
        return sub

    async def publish(self, subject: str, envelope: Envelope) -> int:
        self._check_send(envelope)
        await self._reachable()
        receivers = self.broker._receivers(subject)
        for sub in receivers:
            sub.transport._deliver(sub, Delivery(_copy(envelope)))
        return len(receivers)

    async def request(self, subject: str, envelope: Envelope, *, timeout: float) -> Envelope:
        self._check_send(envelope)
        reply: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()

        async def answer(response: Envelope) -> None:
            await self.broker._unfrozen()
            if not reply.done():
                reply.set_result(_copy(response))

        try:
            async with asyncio.timeout(timeout):
                await self._reachable()
                receivers = [sub for sub in self.broker._receivers(subject) if not sub.transport.crashed]
                if not receivers:
                    raise NoResponderError(f"nobody listens on {subject}")
                # Each receiver gets it, the first answer is the reply, as on NATS and Redis (two
                # processes subscribed as one node id both run it: what a replacement must prevent).
                for receiver in receivers:
                    receiver.transport._deliver(receiver, Delivery(_copy(envelope), answer))
                return await reply
        except TimeoutError:
            raise RequestTimeoutError(f"no reply on {subject} within {timeout:.3f} s") from None

    def _check_send(self, envelope: Envelope) -> None:
        self._check()
        if envelope.size() > self.max_payload:
            raise MessageTooLargeError(f"envelope of {envelope.size()} bytes is over {self.max_payload}")

    def _deliver(self, sub: _Sub, delivery: Delivery) -> None:
        if self._paused is None:
            self._context.copy().run(sub.callback, delivery)
            return
        task = asyncio.get_running_loop().create_task(
            self._deliver_later(self._paused, sub, delivery), context=self._context.copy()
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver_later(self, resumed: asyncio.Event, sub: _Sub, delivery: Delivery) -> None:
        await resumed.wait()
        if not self.crashed and not self.closed:
            sub.callback(delivery)


def _copy(envelope: Envelope) -> Envelope:
    return Envelope(dict(envelope.headers), envelope.body)
