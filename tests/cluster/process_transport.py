"""One node's in-memory connection as its process lives it: calls that take time, and SIGSTOP.

`InMemoryTransport` answers membership calls without ever yielding to the event loop, and its
`InMemoryTransport.pause` holds deliveries while the node's own loops run on. Real processes differ
in two ways that membership must survive, and `ProcessTransport` adds both on a virtual clock:

- ``latency``: every membership call takes a round trip, so concurrent calls interleave;
- `ProcessTransport.freeze` / `ProcessTransport.thaw`: while frozen, deliveries, membership calls
  and watch events wait and the process's `clock` stands still. On thaw the clock shows the time
  that really passed, and the backlog is read a moment later: a resumed asyncio process runs its
  overdue timers (one hop from the loop) before it has read its sockets (several hops).

One gap remains: the frozen node's timers still fire on the shared loop (``asyncio.timeout`` around
a held call, say), earlier than they would in a stopped process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi_catga.core.envelope import Envelope
from fastapi_catga.testing import InMemoryBroker, InMemoryTransport
from fastapi_catga.transports.base import (
    ConnectionListener,
    DeliveryCallback,
    MemberEvent,
    MembershipStore,
    MemberWatch,
    Subscription,
)
from fastapi_catga.transports.durable import DurableStore

__all__ = ["ProcessTransport"]


class _Watch:
    def __init__(self, inner: MemberWatch, process: ProcessTransport) -> None:
        self._inner = inner
        self._process = process
        self._open = True

    async def __aiter__(self) -> AsyncIterator[MemberEvent]:
        async for event in self._inner:
            await self._process.running.wait()
            yield event

    async def stop(self) -> None:
        if self._open:
            self._open = False
            self._process.open_watches -= 1
        await self._inner.stop()


class _Store:
    def __init__(self, inner: MembershipStore, process: ProcessTransport) -> None:
        self._inner = inner
        self._process = process

    async def prepare(self, ttl: float) -> None:
        await self._process.round_trip()
        await self._inner.prepare(ttl)

    async def put(self, node_id: str, value: bytes, ttl: float) -> None:
        await self._process.round_trip()
        await self._inner.put(node_id, value, ttl)

    async def create(self, node_id: str, value: bytes, ttl: float, *, replacing: bytes | None = None) -> bool:
        await self._process.round_trip()
        return await self._inner.create(node_id, value, ttl, replacing=replacing)

    async def delete(self, node_id: str) -> None:
        await self._process.round_trip()
        await self._inner.delete(node_id)

    async def list(self) -> dict[str, bytes]:
        await self._process.round_trip()
        return await self._inner.list()

    async def watch(self) -> MemberWatch:
        await self._process.round_trip()
        watch = _Watch(await self._inner.watch(), self._process)
        self._process.open_watches += 1
        return watch


class ProcessTransport:
    """An `InMemoryTransport` on ``broker``, with the process's monotonic `clock`.

    Args:
        latency: seconds each membership call takes before it reaches the broker.
    """

    name = "memory"
    supports_queue_groups = True

    def __init__(self, broker: InMemoryBroker, *, latency: float = 0.0) -> None:
        self.inner = InMemoryTransport(broker)
        self.max_payload = self.inner.max_payload
        self.latency = latency
        #: Watches opened and not stopped yet.
        self.open_watches = 0
        #: Set while the process runs; cleared while it is frozen.
        self.running = asyncio.Event()
        self.running.set()
        self._time = broker.clock
        self._frozen_at: float | None = None
        self._members = _Store(self.inner.members, self)

    def clock(self) -> float:
        """The process's monotonic clock: still while frozen, the broker's clock otherwise."""
        return self._time() if self._frozen_at is None else self._frozen_at

    async def round_trip(self) -> None:
        await self.running.wait()
        if self.latency:
            await asyncio.sleep(self.latency)

    def freeze(self) -> None:
        """SIGSTOP: deliveries, membership calls and watch events wait; the clock stops."""
        self._frozen_at = self._time()
        self.running.clear()
        self.inner.pause()

    def thaw(self, backlog_after: float) -> None:
        """SIGCONT: the clock jumps to now; what waited runs ``backlog_after`` seconds later."""
        self._frozen_at = None
        asyncio.get_running_loop().call_later(backlog_after, self._run_backlog)

    def _run_backlog(self) -> None:
        self.running.set()
        self.inner.resume()

    @property
    def bad_frames(self) -> int:
        return self.inner.bad_frames

    @property
    def connected(self) -> bool:
        return self.inner.connected

    @property
    def durable(self) -> DurableStore:
        return self.inner.durable

    @property
    def members(self) -> MembershipStore:
        return self._members

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        self.inner.add_connection_listener(listener)

    async def connect(self) -> None:
        await self.inner.connect()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def subscribe(
        self, subject: str, callback: DeliveryCallback, *, queue: str | None = None
    ) -> Subscription:
        await self.running.wait()
        return await self.inner.subscribe(subject, callback, queue=queue)

    async def publish(self, subject: str, envelope: Envelope) -> int | None:
        await self.running.wait()
        return await self.inner.publish(subject, envelope)

    async def request(self, subject: str, envelope: Envelope, *, timeout: float) -> Envelope:
        await self.running.wait()
        return await self.inner.request(subject, envelope, timeout=timeout)
