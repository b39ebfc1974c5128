"""Membership on a virtual clock: joins, heartbeats, evictions, outages and pauses, in milliseconds.

Every test is a plain function running a scenario with `run_virtual`: the nodes, the in-memory
broker's record expiry and the test's own ``asyncio.sleep`` all run on the loop's virtual clock,
so a TTL boundary is asserted on both sides to the millisecond and ten TTLs pass at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import pytest

from fastapi_catga import Catga, CatgaSettings, build
from fastapi_catga.core.observe import Observer
from fastapi_catga.testing import InMemoryBroker, InMemoryTransport
from fastapi_catga.transports.base import MemberEvent
from tests.cluster import workload
from tests.cluster.process_transport import ProcessTransport
from tests.polling import eventually
from tests.virtual_time import EPOCH, run_virtual

HEARTBEAT = 1.0
TTL = 3.0
SWEEP = 0.3  # Membership's sweep interval for this TTL: ttl / 10
TICK = 0.001  # a virtual millisecond: enough for queued watch events to be applied


class Cluster:
    """Nodes on one in-memory broker, everything on the running loop's virtual clock."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.broker = InMemoryBroker(clock=self.loop.time)
        self.nodes: dict[str, Catga] = {}
        self.puts: list[tuple[float, str]] = []  # (virtual time, node id) of every record written
        self._tasks: list[asyncio.Task[None]] = []

    def now(self) -> float:
        return self.loop.time()

    async def start(self, *names: str, process: ProcessTransport | None = None) -> list[Catga]:
        """Start nodes in turn; with ``process``, one node on that transport and its clock."""
        assert process is None or len(names) == 1
        started = []
        for name in names:
            transport = process or InMemoryTransport(self.broker)
            clock = process.clock if process is not None else self.loop.time
            node = build(
                CatgaSettings(node_id=name, heartbeat_interval=HEARTBEAT, node_ttl=TTL),
                handlers=[workload],
                transport=transport,
                clock=clock,
                wall_clock=lambda: EPOCH + self.loop.time(),
            )
            await node.start()
            self.nodes[name] = node
            started.append(node)
        return started

    def transport(self, name: str) -> InMemoryTransport:
        transport = self.nodes[name].node.transport
        assert isinstance(transport, InMemoryTransport)
        return transport

    def view(self, name: str) -> set[str]:
        return {info.node_id for info in self.nodes[name].node.nodes()}

    def views(self, names: Iterable[str]) -> dict[str, set[str]]:
        return {name: self.view(name) for name in names}

    async def record_puts(self) -> None:
        """Watch the store from a bystander connection, noting when each record is written."""
        bystander = InMemoryTransport(self.broker)
        await bystander.connect()
        watch = await bystander.members.watch()

        async def follow() -> None:
            async for event in watch:
                if event.kind == "put":
                    self.puts.append((self.now(), event.node_id))

        self._tasks.append(self.loop.create_task(follow()))

    def last_put(self, name: str) -> float:
        return max(at for at, node_id in self.puts if node_id == name)

    async def sleep_until(self, when: float) -> None:
        assert when > self.now(), f"{when} is already past ({self.now()})"
        await asyncio.sleep(when - self.now())

    async def stop_all(self) -> None:
        for node in self.nodes.values():
            transport = node.node.transport
            if transport.connected:
                await node.stop()


@asynccontextmanager
async def cluster() -> AsyncIterator[Cluster]:
    nodes = Cluster()
    try:
        yield nodes
    finally:
        await nodes.stop_all()


ABC = {"a", "b", "c"}


# -- joining ---------------------------------------------------------------------------------------------


def test_a_node_sees_every_member_as_soon_as_it_has_started() -> None:
    async def scenario() -> None:
        async with cluster() as nodes:
            await nodes.start("a", "b")
            assert nodes.view("b") == {"a", "b"}  # b listed a's record while joining
            await asyncio.sleep(TICK)
            assert nodes.view("a") == {"a", "b"}  # a's watch brought b's record
            (late,) = await nodes.start("late")
            assert nodes.view("late") == {"a", "b", "late"}  # before any time passed
            info = {n.node_id: n for n in late.node.nodes()}
            assert info["a"].handles == ["Flaky", "Sticky", "Work"]
            await asyncio.sleep(TICK)
            assert nodes.views(["a", "b"]) == {"a": {"a", "b", "late"}, "b": {"a", "b", "late"}}

    run_virtual(scenario())


def test_heartbeats_keep_every_member_for_many_ttls() -> None:
    async def scenario() -> None:
        async with cluster() as nodes:
            await nodes.record_puts()
            await nodes.start("a", "b", "c")
            start = nodes.now()
            await asyncio.sleep(10 * TTL)
            assert nodes.views(ABC) == dict.fromkeys(ABC, ABC)
            # The heartbeats that kept them: one per interval from each node.
            beats = [at for at, node_id in nodes.puts if node_id == "b" and at > start]
            assert len(beats) == pytest.approx(10 * TTL / HEARTBEAT, abs=1)

    run_virtual(scenario())


# -- leaving ---------------------------------------------------------------------------------------------


def test_a_killed_node_is_evicted_one_ttl_after_its_last_heartbeat_and_not_before() -> None:
    async def scenario() -> None:
        async with cluster() as nodes:
            await nodes.record_puts()
            await nodes.start("a", "b", "c")
            await asyncio.sleep(2.5 * HEARTBEAT)
            nodes.transport("c").crash()
            last_heartbeat = nodes.last_put("c")
            assert nodes.now() - HEARTBEAT <= last_heartbeat < nodes.now()
            await nodes.sleep_until(last_heartbeat + TTL - TICK)
            assert nodes.views(["a", "b"]) == {"a": ABC, "b": ABC}
            # Evicted by the first sweep after the TTL ran out.
            await nodes.sleep_until(last_heartbeat + TTL + SWEEP + TICK)
            assert nodes.views(["a", "b"]) == {"a": {"a", "b"}, "b": {"a", "b"}}
            # Its record expired in the store too: a node joining now never sees it.
            (late,) = await nodes.start("late")
            assert nodes.view("late") == {"a", "b", "late"}

    run_virtual(scenario())


def test_a_node_that_stops_leaves_every_view_at_once() -> None:
    async def scenario() -> None:
        async with cluster() as nodes:
            _, _, c = await nodes.start("a", "b", "c")
            await asyncio.sleep(1.5 * HEARTBEAT)
            left_at = nodes.now()
            await c.stop()
            await asyncio.sleep(TICK)
            assert nodes.views(["a", "b"]) == {"a": {"a", "b"}, "b": {"a", "b"}}
            assert nodes.now() - left_at < 2 * TICK  # no TTL waited

    run_virtual(scenario())


# -- broker outages --------------------------------------------------------------------------------------


def test_a_broker_outage_freezes_every_view_and_evicts_nobody() -> None:
    async def scenario() -> None:
        async with cluster() as nodes:
            a, b, c = await nodes.start("a", "b", "c")
            await asyncio.sleep(1.5 * HEARTBEAT)
            nodes.broker.outage()
            assert all(node.node.view.stale for node in (a, b, c))
            assert a.node.health()["status"] == "unavailable"
            for _ in range(10):  # ten TTLs without a heartbeat, checked after each one
                await asyncio.sleep(TTL)
                assert nodes.views(ABC) == dict.fromkeys(ABC, ABC)
                assert all(node.node.view.stale for node in (a, b, c))

    run_virtual(scenario())


def test_after_an_outage_views_resync_and_a_node_lost_meanwhile_gets_one_ttl() -> None:
    async def scenario() -> None:
        async with cluster() as nodes:
            a, b, _ = await nodes.start("a", "b", "c")
            await asyncio.sleep(1.5 * HEARTBEAT)
            nodes.broker.outage()
            await asyncio.sleep(TTL)
            nodes.transport("c").crash()  # dies while nobody can tell
            await asyncio.sleep(5 * TTL)
            nodes.broker.restore()
            restored = nodes.now()
            await asyncio.sleep(TICK)
            assert not a.node.view.stale and not b.node.view.stale
            assert a.node.health()["status"] == "ok"
            # Nobody could heartbeat through the outage: c gets a full TTL from the restore...
            await nodes.sleep_until(restored + TTL - TICK)
            assert nodes.views(["a", "b"]) == {"a": ABC, "b": ABC}
            # ...and is evicted by the first sweep after it, while the live nodes stay.
            await nodes.sleep_until(restored + TTL + SWEEP + TICK)
            assert nodes.views(["a", "b"]) == {"a": {"a", "b"}, "b": {"a", "b"}}
            await asyncio.sleep(5 * TTL)
            assert nodes.views(["a", "b"]) == {"a": {"a", "b"}, "b": {"a", "b"}}

    run_virtual(scenario())


# -- a paused process ------------------------------------------------------------------------------------


def test_a_process_paused_longer_than_the_ttl_evicts_no_peer_when_it_resumes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fastapi_catga.cluster.membership")

    async def scenario() -> None:
        async with cluster() as nodes:
            await nodes.start("a", "c")
            b = ProcessTransport(nodes.broker)
            await nodes.start("b", process=b)
            await asyncio.sleep(1.5 * HEARTBEAT)
            b.freeze()  # SIGSTOP: b's heartbeats, watch, deliveries and clock stand still
            await asyncio.sleep(3 * TTL)
            # b was silent for longer than the TTL: its peers rightly evicted it...
            assert nodes.views(["a", "c"]) == {"a": {"a", "c"}, "c": {"a", "c"}}
            # SIGCONT: b's clock jumps 3 TTLs past its peers' last heartbeats, and its overdue
            # sweep runs before it has read the heartbeats that waited meanwhile.
            b.thaw(backlog_after=1.5 * SWEEP)
            await asyncio.sleep(2 * HEARTBEAT)
            # ...and b, back, kept its peers (its silence was its own) and rejoined theirs.
            assert nodes.views(ABC) == dict.fromkeys(ABC, ABC)

    run_virtual(scenario())
    evictions = [r.getMessage() for r in caplog.records if "evicted" in r.getMessage()]
    assert evictions == ["node b evicted: no heartbeat for 3.0 s"] * 2  # by a and by c, never by b


# -- a broker over a network -----------------------------------------------------------------------------


def test_joining_over_a_network_opens_one_watch_and_stopping_closes_it() -> None:
    """Each membership call takes a round trip, as over NATS or Redis: calls can interleave."""

    async def scenario() -> None:
        async with cluster() as nodes:
            await nodes.start("a")
            b = ProcessTransport(nodes.broker, latency=0.001)
            (node,) = await nodes.start("b", process=b)
            assert nodes.view("b") == {"a", "b"}
            await asyncio.sleep(2 * HEARTBEAT)
            assert b.open_watches == 1
            await node.stop()
            assert b.open_watches == 0
            await nodes.start("c")
            await asyncio.sleep(TICK)
            assert nodes.view("a") == {"a", "c"}
            assert "c" not in nodes.view("b")  # a stopped node follows the cluster no more

    run_virtual(scenario())


class Departures(Observer):
    def __init__(self) -> None:
        self.left: list[tuple[str, bool]] = []

    def member_left(self, node_id: str, size: int, *, evicted: bool) -> None:
        self.left.append((node_id, evicted))


async def test_a_record_the_store_expired_is_an_eviction_and_a_removed_one_a_leave(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """NATS 2.11+ tells of a record that expired (a node that died): that is an eviction, in the
    log and the metrics, as the sweep's are; a record deleted is a graceful leave."""
    caplog.set_level(logging.INFO, logger="fastapi_catga.cluster.membership")
    broker, departures = InMemoryBroker(), Departures()
    nodes = [
        build(
            CatgaSettings(node_id=name),
            handlers=[workload],
            transport=InMemoryTransport(broker),
            observers=[departures] if name == "a" else [],
        )
        for name in "abc"
    ]
    for node in nodes:
        await node.start()
    try:
        membership = nodes[0].node.membership
        await eventually(lambda: len(nodes[0].node.nodes()) == 3, within=2)
        membership._apply(MemberEvent("delete", "b", expired=True), membership._clock())
        membership._apply(MemberEvent("delete", "c"), membership._clock())
        assert departures.left == [("b", True), ("c", False)]
        assert "node b evicted" in caplog.text and "node c left the cluster" in caplog.text
    finally:
        for node in nodes:
            await node.stop()
