"""Membership: claim the id, register, list-then-watch, heartbeat, local sweep, resync after trouble.

The protocol, over any `MembershipStore`:

- start: make sure no live process holds this node id, then watch, register and list, so no
  change between the list and the watch is missed and a late joiner sees everyone before it
  reports ready;
- every ``heartbeat_interval`` rewrite this node's record (restarting its TTL in the store);
- every ``sweep_interval`` evict members not observed for ``ttl`` seconds on the local monotonic
  clock: brokers' expiry events (NATS 2.11+ markers) only speed it up;
- a member is evicted only when this node's *own* heartbeat came back through the store after that
  member went quiet: a store that is down, frozen or silent (whose watch has stopped) stops
  everyone's heartbeats alike, so it proves nothing about the members. When the own heartbeat has
  not come back for a whole TTL the view freezes (``stale``: 503 on ``/catga/health``) until a
  resync succeeds, and nobody is evicted for the outage;
- connection lost: freeze the view, evict nobody; back: recreate the bucket, re-register, new
  watch, full resync, every member given a full TTL to show up;
- stop: delete this node's record first, so peers drop it at once;
- replaced: a process that finds its id held by a newer incarnation (started later: it claimed the
  id once this one's record lapsed, while this process was frozen or cut off for a TTL), and sees
  that record refreshed, steps down, writing nothing more (`Membership.replaced_by`); the newer
  one re-asserts its record whenever the older one writes over it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from fastapi_catga.cluster.identity import claim_node_id, read_record
from fastapi_catga.cluster.supervised import supervised
from fastapi_catga.cluster.view import ClusterView
from fastapi_catga.core.logs import LogLimiter
from fastapi_catga.core.nodes import NodeInfo
from fastapi_catga.core.observe import Observer
from fastapi_catga.core.tasks import cancel_and_wait
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
        wall_clock: UNIX seconds, for the ``last_seen`` a record shows.
        on_replaced: called once when a newer process took this node's id (see `replaced_by`).
        on_hold: called with True when this process was frozen for longer than the TTL (what it
            reads now may have gone to a replacement too: run none of it), with False once its
            record is its own again.
    """

    def __init__(
        self,
        transport: Transport,
        view: ClusterView,
        *,
        heartbeat_interval: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        observer: Observer | None = None,
        on_replaced: Callable[[NodeInfo], None] | None = None,
        on_hold: Callable[[bool], None] | None = None,
    ) -> None:
        self._observer = observer
        self._on_replaced = on_replaced
        #: The newer process's record that took this node's id; this one writes nothing more.
        self.replaced_by: NodeInfo | None = None
        # Newer incarnations seen under this id: the last_seen of their record, when first seen.
        self._twins: dict[str, tuple[datetime, float]] = {}
        self._on_hold = on_hold
        #: Frozen past the TTL, this process runs nothing until it knows its id is still its own.
        self.held = False
        self._transport = transport
        self._store = transport.members
        self.view = view
        self.heartbeat_interval = heartbeat_interval
        self.sweep_interval = min(1.0, max(0.05, view.ttl / 10))
        #: Unexpected failures of the membership loops, by loop: each was logged and retried.
        self.failures: Counter[str] = Counter()
        self._clock = clock
        self._wall_clock = wall_clock
        self._watch: MemberWatch | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._resync_task: asyncio.Task[None] | None = None
        self._resync_again = False  # a resync was asked for while one ran
        self._loops: list[asyncio.Task[None]] = []
        self._claimed = False  # claim() found this node id free
        self._joined = False  # connection events matter only once start() has joined
        self._stopping = False
        # When this node's own record last came back through the watch (or a sync succeeded): the
        # latest proof that the store carries heartbeats.
        self._proven_at = clock()
        self._after_outage = False  # the next resync follows a broker or store outage
        self._grace_until = -math.inf  # until then, an expired record evicts nobody (after an outage)
        self._log_limit = LogLimiter()
        transport.add_connection_listener(self._on_connection)

    @property
    def node_id(self) -> str:
        return self.view.node_id

    @property
    def joined(self) -> bool:
        """Whether start() has joined the cluster (and stop() has not begun)."""
        return self._joined and not self._stopping

    async def claim(self, join_timeout: float = 10.0) -> None:
        """Make sure the store works and no live process holds this node's id (an earlier one's
        record is waited out, up to a TTL); before the node takes traffic, so a twin serves nothing.

        Raises: as `start`.
        """
        await self._until_ready(lambda: self._store.prepare(self.view.ttl), join_timeout)
        # Again from the top if the store fails meanwhile (a NATS cluster whose bucket has no stream
        # leader yet): a create that went through but was not answered shows as our own record.
        await self._until_ready(
            lambda: claim_node_id(
                self._store,
                self.view.self_info,
                ttl=self.view.ttl,
                poll=min(0.5, self.heartbeat_interval / 2),
                clock=self._clock,
            ),
            join_timeout,
        )
        self._claimed = True

    async def start(self, join_timeout: float = 10.0) -> None:
        """Join: the view is complete when this returns. Runs `claim` first if it has not run; a
        store that is reachable but not ready is retried for up to ``join_timeout`` seconds.

        Raises:
            TransportError: the membership store did not work within ``join_timeout``.
            ConfigurationError: a live process holds this node's id.
        """
        if not self._claimed:
            await self.claim(join_timeout)
        await self._until_ready(self._sync, join_timeout)
        self._joined = True
        if self.replaced_by is not None:  # a newer process took the id as this one started
            return
        self._loops = [
            asyncio.create_task(self._supervised("heartbeat", self._heartbeat), name="catga-heartbeat"),
            asyncio.create_task(self._supervised("sweep", self._sweep), name="catga-sweep"),
        ]
        logger.info("node %s joined cluster with %d member(s)", self.node_id, len(self.view.nodes()))

    async def _until_ready(self, call: Callable[[], Awaitable[None]], join_timeout: float) -> None:
        deadline, delay = self._clock() + join_timeout, 0.05
        while True:
            try:
                await call()
                return
            except TransportError as exc:
                if self._clock() + delay > deadline:
                    raise
                logger.info("membership store not ready (%s); retrying in %.2f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)

    async def stop(self, timeout: float = 2.0) -> None:
        """Leave: delete this node's record (peers drop it at once), stop every loop and wait for it.
        A node whose claim failed deletes nothing: the record is a live twin's."""
        self._stopping = True
        tasks = [task for task in (*self._loops, self._watch_task, self._resync_task) if task is not None]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._stop_watch()
        if self._claimed and self._transport.connected:
            try:
                async with asyncio.timeout(timeout):
                    await self._store.delete(self.node_id)
            except (TransportError, TimeoutError) as exc:
                logger.warning(
                    "node %s could not deregister (%s); peers evict it after the TTL",
                    self.node_id,
                    str(exc) or "the store did not answer",
                )
        await cancel_and_wait(tasks, what="membership", logger=logger, grace=timeout)

    async def _sync(self, *, after_outage: bool = False) -> None:
        await self._stop_watch()
        await self._store.prepare(self.view.ttl)
        watch = await self._store.watch()
        self._watch = watch
        records = await self._store.list()
        newer = self._newer_twin(_record_of(self.node_id, records.get(self.node_id)))
        if newer is not None and self._replaced(newer):
            return
        # Held after a pause, a newer record is left alone for a TTL: a live replacement's next
        # heartbeat shows it refreshed (this one then steps down); one that stays still was no
        # live process's, and is written over.
        waiting = self.held and newer is not None and not self._stale_twin(newer)
        if waiting:
            asyncio.get_running_loop().call_later(self.view.ttl, self._schedule_resync)
        else:
            await self._register()
        now = self._clock()
        if after_outage:  # nobody could heartbeat through the outage: give everyone a full TTL
            self.view.refresh_all(now)
            # Records that lapsed in the outage may still expire in the store as it comes back:
            # those expiries evict nobody within the TTL (the sweep does, if no heartbeat came);
            # a node that leaves (its own delete) is dropped at once, as ever.
            self._grace_until = now + self.view.ttl
        for node_id, value in records.items():
            if node_id != self.node_id:
                self._apply(MemberEvent("put", node_id, value), now)
        self._proven_at = now  # the store answered every call just now
        # Still stale if the connection dropped meanwhile: the reconnect brings another resync.
        self.view.stale = not self._transport.connected
        self._watch_task = asyncio.create_task(self._follow(watch), name="catga-membership-watch")
        if self.held and not waiting:
            logger.info("node %s: its node id is its own again; it runs what it receives", self.node_id)
            self._hold(False)

    def _hold(self, held: bool) -> None:
        self.held = held
        if self._on_hold is not None:
            self._on_hold(held)

    async def _register(self) -> None:
        if self.replaced_by is not None:
            return  # the record is the newer process's
        self.view.self_info.last_seen = datetime.fromtimestamp(self._wall_clock(), UTC)
        await self._store.put(self.node_id, self.view.self_info.model_dump_json().encode(), self.view.ttl)

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
        except Exception:
            self.failures["watch"] += 1
            logger.exception("membership watch failed; resyncing")
            self._distrust_view("the membership watch failed")

    def _apply(self, event: MemberEvent, now: float) -> None:
        if event.kind == "delete":
            if event.node_id == self.node_id and not self._stopping:
                logger.warning(
                    "node %s: own record vanished (expired while paused?); registering again", self.node_id
                )
                self._schedule_resync()
            elif event.node_id != self.node_id and event.expired and now < self._grace_until:
                logger.info(
                    "node %s: its record lapsed with the outage; it has a TTL to show up", event.node_id
                )
            elif event.node_id != self.node_id and self.view.remove(event.node_id):
                # Expired in the store: no heartbeat for a TTL, an eviction as the sweep's are.
                self._gone(event.node_id, evicted=event.expired)
            return
        try:
            info = read_record(event.node_id, event.value)
        except ValueError as exc:
            self._warn("record", "ignoring the membership record under %r: %s", event.node_id[:80], exc)
            return
        if info.node_id != self.node_id:
            joined = self.view.get(info.node_id) is None
            if joined:
                logger.info("node %s joined (handles %s)", info.node_id, ", ".join(info.handles) or "nothing")
            self.view.observe(info, now)
            if joined and self._observer is not None:
                self._observer.member_joined(info.node_id, len(self.view.nodes()))
        elif info.incarnation == self.view.self_info.incarnation:
            self._proven_at = now  # our heartbeat made it through the store and back
        elif (newer := self._newer_twin(info)) is not None:
            self._replaced(newer)
        else:
            self._warn(
                "twin",
                "an older process (started %s) writes records as node %s: it steps down once it sees "
                "this one's; node ids must be unique",
                info.started_at.isoformat(), self.node_id,
            )  # fmt: skip
            self._schedule_resync()  # our record again, now: peers and the older one read it

    def _newer_twin(self, other: NodeInfo | None) -> NodeInfo | None:
        """``other``, the record under this node's id, when a process that started after this one
        wrote it (by ``started_at``, then incarnation: of two processes, exactly one is the newer)."""
        me = self.view.self_info
        if other is None or other.incarnation == me.incarnation:
            return None
        try:
            mine, theirs = me.started_at.timestamp(), other.started_at.timestamp()
        except (ValueError, OverflowError, OSError):  # a time no clock can hold
            return None
        return other if (theirs, other.incarnation) > (mine, me.incarnation) else None

    def _replaced(self, newer: NodeInfo) -> bool:
        """Step down once a newer process's record under this id is seen refreshed (its
        ``last_seen`` moved): that process is alive. A record written once and never again (a twin
        refused at start-up after its create went through) replaces nobody."""
        seen = self._twins.get(newer.incarnation)
        if seen is None:
            if len(self._twins) >= 16:  # records of many incarnations: keep the latest sightings
                self._twins.clear()
            self._twins[newer.incarnation] = (newer.last_seen, self._clock())
            return False
        if seen[0] == newer.last_seen:
            return False
        if self.replaced_by is None:
            self._step_down(newer)
        return True

    def _stale_twin(self, newer: NodeInfo) -> bool:
        """Whether a newer record under this id was first seen a TTL ago, and not refreshed since."""
        seen = self._twins.get(newer.incarnation)
        return seen is not None and self._clock() - seen[1] >= self.view.ttl

    def _step_down(self, newer: NodeInfo) -> None:
        """A newer process holds this node's id: write nothing more (its record is not ours to
        refresh or delete), stop the loops and tell the node, which stops serving."""
        logger.error(
            "node %s: a newer process (started %s) holds this node id and refreshes it (this one was "
            "likely frozen or cut off for a TTL); this one steps down and serves nothing more "
            "(/catga/health answers 503): restart it, with another CATGA_NODE_ID if both should run",
            self.node_id,
            newer.started_at.isoformat(),
        )
        self.replaced_by = newer
        self._claimed = False  # the record is the newer one's: stop() must not delete it
        self._stopping = True  # no heartbeat, resync or re-registration from here on
        self.view.stale = True
        for task in (*self._loops, self._resync_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        if self._on_replaced is not None:
            self._on_replaced(newer)

    def _warn(self, kind: str, text: str, *args: object) -> None:
        self._log_limit.log(logger, logging.WARNING, kind, text, *args)

    def _on_connection(self, connected: bool) -> None:
        if self._stopping or not self._joined:
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

    def _distrust_view(self, reason: str) -> None:
        """The silence of peers proves nothing now: freeze the view until a resync succeeds."""
        self._after_outage = True
        if not self._transport.connected:
            return  # the reconnect brings a resync
        if not self.view.stale:
            logger.warning("node %s: %s; view frozen until a resync", self.node_id, reason)
            self.view.stale = True
        self._schedule_resync()  # even while one runs: its snapshot may predate this

    def _schedule_resync(self) -> None:
        if self._stopping:
            return
        if self._resync_task is None or self._resync_task.done():
            self._resync_task = asyncio.get_running_loop().create_task(self._resync(), name="catga-resync")
        else:
            self._resync_again = True  # asked while one runs: it runs once more when done

    async def _resync(self) -> None:
        delay = 0.05
        while not self._stopping:
            self._resync_again = False
            try:
                async with asyncio.timeout(self._store_timeout):
                    await self._sync(after_outage=self._after_outage)
                if self.replaced_by is not None:
                    return
                if self._resync_again:
                    self.view.stale = True  # what asked for it came after this sync began
                    continue
                if not self._transport.connected:
                    return  # lost again as it ended: the reconnect's resync keeps the outage's grace
                self._after_outage = False
                logger.info("node %s resynced: %d member(s)", self.node_id, len(self.view.nodes()))
                return
            except (TransportError, TimeoutError) as exc:
                logger.debug(
                    "resync failed (%s); retrying in %.2f s", str(exc) or "the store did not answer", delay
                )
            except Exception:
                self.failures["resync"] += 1
                logger.exception("resync failed unexpectedly; retrying in %.2f s", delay)
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)

    def _supervised(self, name: str, step: Callable[[], Awaitable[None]]) -> Coroutine[Any, Any, None]:
        return supervised(name, step, pause=self.heartbeat_interval, failures=self.failures)

    @property
    def _store_timeout(self) -> float:
        """How long one store call may take before it counts as failed: a frozen broker must not
        hold a loop forever."""
        return max(1.0, self.view.ttl)

    async def _heartbeat(self) -> None:
        await asyncio.sleep(self.heartbeat_interval)
        if not self._transport.connected or self.held:  # held: the resync writes the record, or not
            return
        try:
            async with asyncio.timeout(self._store_timeout):
                await self._register()
        except (TransportError, TimeoutError) as exc:
            # Connected, yet the store refuses or stalls (a NATS cluster electing a new leader for
            # the bucket, a Redis replica in read-only mode, a frozen server...). Peers' heartbeats
            # are likely failing too: judge nobody until the store works again, then resync.
            self._distrust_view(f"heartbeat failed ({str(exc) or 'the store did not answer'})")

    async def _sweep(self) -> None:
        before = self._clock()
        await asyncio.sleep(self.sweep_interval)
        now = self._clock()
        if now - before > self.view.ttl and not self.held:
            # Long enough for a replacement to have taken this node id: what this process reads
            # now (sent to the id while it stood still) may have gone to that one too. Timers
            # overdue run before what a socket brought is read: nothing of it runs first.
            logger.warning(
                "node %s was frozen for %.1f s, past the TTL: it runs nothing it receives until it "
                "has checked that its node id is still its own",
                self.node_id,
                now - before,
            )
            self._hold(True)
        # A gap far beyond the interval means this process was frozen (SIGSTOP, a long GC, a blocked
        # loop) for longer than a heartbeat: the silence is ours, not the peers'. Resync instead.
        if now - before > max(self.heartbeat_interval, 4 * self.sweep_interval):
            self._distrust_view(f"this process was frozen for {now - before:.1f} s")
        elif now - self._proven_at > self.view.ttl:
            self._distrust_view("its own heartbeat has not come back through the store for a TTL")
        for node_id in self.view.sweep(now, proven_at=self._proven_at, margin=self.heartbeat_interval):
            self._gone(node_id, evicted=True)

    def _gone(self, node_id: str, *, evicted: bool) -> None:
        """Tell the log and the observer that ``node_id`` left the view (a leave, or an eviction)."""
        if evicted:
            logger.warning("node %s evicted: no heartbeat for %.1f s", node_id, self.view.ttl)
        else:
            logger.info("node %s left the cluster", node_id)
        if self._observer is not None:
            self._observer.member_left(node_id, len(self.view.nodes()), evicted=evicted)


def _record_of(node_id: str, value: bytes | None) -> NodeInfo | None:
    """The record listed under ``node_id``, or None where there is none that can be read."""
    try:
        return None if value is None else read_record(node_id, value)
    except ValueError:
        return None
