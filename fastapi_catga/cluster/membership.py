"""Membership: register, list-then-watch, heartbeat, local sweep, resync after reconnect.

The protocol, over any `MembershipStore`:

- start: watch first, then register, then list, so no change between the list and the watch is
  missed and a late joiner sees everyone before it reports ready;
- every ``heartbeat_interval`` rewrite this node's record (restarting its TTL in the store);
- every ``sweep_interval`` evict members not observed for ``ttl`` seconds on the local monotonic
  clock: brokers' expiry events (NATS 2.11+ markers, Redis keyspace events) only speed it up;
- connection lost: freeze the view (``stale``), evict nobody;
- connection back: recreate the bucket, re-register, new watch, full resync;
- stop: delete this node's record first, so peers drop it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from pydantic import ValidationError

from fastapi_catga.cluster.view import ClusterView
from fastapi_catga.core.nodes import NodeInfo, utc_now
from fastapi_catga.exceptions import TransportError
from fastapi_catga.transports.base import MemberEvent, MemberWatch, Transport

__all__ = ["Membership"]

logger = logging.getLogger(__name__)


class Membership:
    """Keeps ``view`` in step with the cluster through ``transport.members``.

    Args:
        transport: the connection; its membership store holds one record per node.
        view: the view to maintain; its ``self_info`` is this node's record.
        heartbeat_interval: seconds between heartbeats.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(
        self,
        transport: Transport,
        view: ClusterView,
        *,
        heartbeat_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._transport = transport
        self._store = transport.members
        self.view = view
        self.heartbeat_interval = heartbeat_interval
        self.sweep_interval = min(1.0, max(0.05, view.ttl / 10))
        self._clock = clock
        self._watch: MemberWatch | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._resync_task: asyncio.Task[None] | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = False
        # When this node's last written heartbeat must have come back through the watch, if any.
        self._echo_due: float | None = None
        self._echo_grace = max(2.0, heartbeat_interval)
        self._after_outage = False  # the next resync follows a broker or store outage
        transport.add_connection_listener(self._on_connection)

    @property
    def node_id(self) -> str:
        return self.view.node_id

    async def start(self, join_timeout: float = 10.0) -> None:
        """Join: the view is complete when this returns.

        A store that is reachable but not ready (a NATS cluster still electing the new bucket's
        leader) is retried for up to ``join_timeout`` seconds.

        Raises:
            TransportError: the membership store did not work within ``join_timeout``.
        """
        deadline, delay = self._clock() + join_timeout, 0.05
        while True:
            try:
                await self._sync()
                break
            except TransportError as exc:
                if self._clock() + delay > deadline:
                    raise
                logger.info("membership store not ready (%s); retrying in %.2f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
        self._loops = [
            asyncio.create_task(self._heartbeat_loop(), name="catga-heartbeat"),
            asyncio.create_task(self._sweep_loop(), name="catga-sweep"),
        ]
        logger.info("node %s joined cluster with %d member(s)", self.node_id, len(self.view.nodes()))

    async def stop(self, timeout: float = 2.0) -> None:
        """Leave: delete this node's record (peers drop it at once), stop every loop."""
        self._stopping = True
        tasks = [*self._loops, self._watch_task, self._resync_task]
        for task in tasks:
            if task is not None:
                task.cancel()
        await self._stop_watch()
        if self._transport.connected:
            try:
                async with asyncio.timeout(timeout):
                    await self._store.delete(self.node_id)
            except (TransportError, TimeoutError) as exc:
                logger.warning(
                    "node %s could not deregister (%s); peers evict it after the TTL", self.node_id, exc
                )
        for task in tasks:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _sync(self, *, after_outage: bool = False) -> None:
        await self._stop_watch()
        await self._store.prepare(self.view.ttl)
        watch = await self._store.watch()
        self._watch = watch
        await self._register()
        records = await self._store.list()
        now = self._clock()
        if after_outage:  # nobody could heartbeat through the outage: give everyone a full TTL
            self.view.refresh_all(now)
        for node_id, value in records.items():
            if node_id != self.node_id:
                self._apply(MemberEvent("put", node_id, value), now)
        # Still stale if the connection dropped meanwhile: the reconnect brings another resync.
        self.view.stale = not self._transport.connected
        self._watch_task = asyncio.create_task(self._follow(watch), name="catga-membership-watch")

    async def _register(self) -> None:
        self.view.self_info.last_seen = utc_now()
        await self._store.put(self.node_id, self.view.self_info.model_dump_json().encode(), self.view.ttl)
        if self._echo_due is None:
            self._echo_due = self._clock() + self._echo_grace

    async def _stop_watch(self) -> None:
        if self._watch_task is not None and self._watch_task is not asyncio.current_task():
            self._watch_task.cancel()
        watch, self._watch = self._watch, None
        if watch is not None:
            with contextlib.suppress(Exception):
                await watch.stop()

    async def _follow(self, watch: MemberWatch) -> None:
        try:
            async for event in watch:
                self._apply(event, self._clock())
        except TransportError as exc:
            logger.info("membership watch ended: %s", exc)

    def _apply(self, event: MemberEvent, now: float) -> None:
        if event.node_id == self.node_id:
            if event.kind == "put":
                self._echo_due = None  # the watch works: it brought back our own heartbeat
            elif not self._stopping:
                logger.warning(
                    "node %s: own record vanished (expired while paused?); registering again", self.node_id
                )
                self._schedule_resync()
            return
        if event.kind == "delete":
            if self.view.remove(event.node_id):
                logger.info("node %s left the cluster", event.node_id)
            return
        try:
            info = NodeInfo.model_validate_json(event.value or b"")
        except ValidationError:
            logger.warning("ignoring unreadable membership record for %r", event.node_id)
            return
        if self.view.get(info.node_id) is None:
            logger.info("node %s joined (handles %s)", info.node_id, ", ".join(info.handles) or "nothing")
        self.view.observe(info, now)

    def _on_connection(self, connected: bool) -> None:
        if self._stopping:
            return
        if not connected:
            if not self.view.stale:
                logger.warning(
                    "node %s lost the broker: view frozen, no evictions until it is back", self.node_id
                )
            self.view.stale = True
            self._after_outage = True
            return
        logger.info("node %s reconnected: re-registering and resyncing", self.node_id)
        self._schedule_resync()

    def _distrust_view(self, reason: str, *, outage: bool = False) -> None:
        """The silence of peers proves nothing now: freeze the view until a resync succeeds."""
        self._after_outage |= outage
        if self._transport.connected and not self.view.stale:
            logger.warning("node %s: %s; view frozen until a resync", self.node_id, reason)
            self.view.stale = True
            self._echo_due = None
            self._schedule_resync()

    def _schedule_resync(self) -> None:
        if self._resync_task is None or self._resync_task.done():
            self._resync_task = asyncio.get_running_loop().create_task(self._resync(), name="catga-resync")

    async def _resync(self) -> None:
        delay = 0.05
        while not self._stopping:
            try:
                await self._sync(after_outage=self._after_outage)
                self._after_outage = False
                logger.info("node %s resynced: %d member(s)", self.node_id, len(self.view.nodes()))
                return
            except TransportError as exc:
                logger.debug("resync failed (%s); retrying in %.2f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            if not self._transport.connected:
                continue
            try:
                await self._register()
            except TransportError as exc:
                # Connected, yet the store refuses writes (a NATS cluster electing a new leader for
                # the bucket, a Redis replica in read-only mode...). Peers' heartbeats are likely
                # failing too: judge nobody until the store works again, then resync.
                self._distrust_view(f"heartbeat failed ({exc})", outage=True)

    async def _sweep_loop(self) -> None:
        last = self._clock()
        while True:
            await asyncio.sleep(self.sweep_interval)
            now = self._clock()
            gap, last = now - last, now
            # A gap far beyond the interval means this process was frozen (SIGSTOP, a long GC,
            # a blocked loop): the silence is ours, not the peers'. Resync instead of evicting.
            if gap > max(1.0, 4 * self.sweep_interval):
                self._distrust_view(f"this process was frozen for {gap:.1f} s")
            elif self._echo_due is not None and now > self._echo_due:
                # Our own heartbeat was written but never came back through the watch: the watch
                # is dead (a NATS stream or consumer changing servers, say).
                self._distrust_view("the membership watch went quiet")
            for node_id in self.view.sweep(now):
                logger.warning("node %s evicted: no heartbeat for %.1f s", node_id, self.view.ttl)
