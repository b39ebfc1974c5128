"""One live process per node id, on a virtual clock: a twin is refused, a restart after a crash rejoins."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from fastapi_catga import Catga, CatgaSettings, Command, ConfigurationError, TransportError, build, handler
from fastapi_catga.cluster.identity import read_record
from fastapi_catga.cluster.view import ClusterView
from fastapi_catga.core.nodes import NodeInfo
from fastapi_catga.testing import InMemoryBroker
from fastapi_catga.transports.base import MemberEvent
from tests.cluster import workload
from tests.cluster.process_transport import ProcessTransport
from tests.polling import eventually
from tests.virtual_time import EPOCH, run_virtual, virtual_node

TIMING: dict[str, Any] = {"heartbeat_interval": 1.0, "node_ttl": 3.0}


def node(broker: InMemoryBroker, node_id: str) -> Catga:
    return virtual_node(broker, node_id, handlers=[workload], **TIMING)


def test_a_second_process_with_a_live_nodes_id_is_refused_at_start() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        first = node(broker, "pod-0")
        await first.start()
        started = loop.time()
        with pytest.raises(ConfigurationError, match="'pod-0' belongs to a live node"):
            await node(broker, "pod-0").start()
        assert loop.time() - started <= TIMING["heartbeat_interval"] + 0.5, "refused within a heartbeat"
        store = first.node.transport.members
        assert list(await store.list()) == ["pod-0"], "the refused twin deleted its record"
        assert [n.node_id for n in first.node.nodes()] == ["pod-0"]
        assert await first.mediator.send(workload.Work()) == "?"  # the first one goes on serving
        await first.stop()

    run_virtual(scenario())


def test_of_two_processes_starting_at_once_with_one_id_only_one_joins() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        # Each membership call takes a millisecond, so both look before either writes.
        twins = [
            virtual_node(
                broker,
                "pod-0",
                handlers=[workload],
                transport=ProcessTransport(broker, latency=0.001),
                **TIMING,
            )
            for _ in range(2)
        ]
        results = await asyncio.gather(*(twin.start() for twin in twins), return_exceptions=True)
        assert [r is None for r in results].count(True) == 1, results
        refused = next(r for r in results if r is not None)
        assert isinstance(refused, ConfigurationError)
        assert "'pod-0' belongs to a live node" in str(refused)
        started = twins[results.index(None)]
        assert [n.node_id for n in started.node.nodes()] == ["pod-0"]
        assert await started.mediator.send(workload.Work()) == "?"
        await started.stop()

    run_virtual(scenario())


def test_a_claim_that_the_store_fails_is_tried_again_until_the_join_timeout() -> None:
    async def scenario() -> None:
        broker = InMemoryBroker(clock=asyncio.get_running_loop().time)
        a = node(broker, "pod-0")
        store = a.node.transport.members
        real_create, failures = store.create, [TransportError("no response from stream")] * 2

        async def create(node_id: str, value: bytes, ttl: float, *, replacing: bytes | None = None) -> bool:
            if failures:
                raise failures.pop()
            return await real_create(node_id, value, ttl, replacing=replacing)

        store.create = create  # type: ignore[method-assign]
        await a.start()  # a NATS cluster whose bucket has no stream leader yet fails the first claims
        assert not failures
        assert [n.node_id for n in a.node.nodes()] == ["pod-0"]
        await a.stop()

    run_virtual(scenario())


def test_a_restart_after_a_crash_waits_out_the_old_record_and_joins_within_ttl_plus_2() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        peer, old = node(broker, "peer"), node(broker, "pod-0")
        await peer.start()
        await old.start()
        old.node.transport.crash()  # type: ignore[attr-defined]
        crashed = loop.time()
        new = node(broker, "pod-0")
        await new.start()
        waited = loop.time() - crashed
        assert TIMING["heartbeat_interval"] < waited <= TIMING["node_ttl"] + 2
        assert {n.node_id for n in new.node.nodes()} == {"pod-0", "peer"}
        await asyncio.sleep(TIMING["node_ttl"] + 1)
        view = {n.node_id: n for n in peer.node.nodes()}
        assert view["pod-0"].incarnation == new.node.view.self_info.incarnation
        for catga in (new, peer):
            await catga.stop()

    run_virtual(scenario())


def test_a_graceful_restart_joins_at_once() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        old = node(broker, "pod-0")
        await old.start()
        await old.stop()
        stopped = loop.time()
        new = node(broker, "pod-0")
        await new.start()
        assert loop.time() - stopped < 0.1
        await new.stop()

    run_virtual(scenario())


def test_a_record_whose_key_names_another_node_is_ignored() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        me = node(broker, "me")
        await me.start()
        forged = NodeInfo(node_id="victim").model_dump_json().encode()
        me.node.membership._apply(MemberEvent("put", "intruder", forged), loop.time())
        assert [n.node_id for n in me.node.nodes()] == ["me"]
        await me.stop()

    run_virtual(scenario())


def test_the_view_evicts_only_after_the_store_proved_it_carries_heartbeats() -> None:
    view = ClusterView(NodeInfo(node_id="me"), ttl=3.0)
    view.observe(NodeInfo(node_id="peer"), now=10.0)
    # The store went silent with the peer: our own last echo is no later than the peer's last heartbeat.
    assert view.sweep(20.0, proven_at=10.5, margin=1.0) == []
    assert view.get("peer") is not None
    # Our heartbeats kept coming back after the peer fell silent: the peer is dead.
    assert view.sweep(20.0, proven_at=12.0, margin=1.0) == ["peer"]


class Count(Command[int]):
    type_name = "identity.Count"


runs: list[int] = []


@handler
async def count(message: Count) -> int:
    runs.append(1)
    return len(runs)


async def pausable_node(broker: InMemoryBroker) -> tuple[ProcessTransport, Catga]:
    """A started node "pod-0" whose process can be SIGSTOPped (`ProcessTransport.freeze`)."""
    loop = asyncio.get_running_loop()
    process = ProcessTransport(broker)
    catga = build(
        CatgaSettings(node_id="pod-0", **TIMING),
        handlers=[count],
        transport=process,
        clock=process.clock,
        wall_clock=lambda: EPOCH + loop.time(),
    )
    await catga.start()
    return process, catga


def test_a_process_that_resumes_after_a_newer_one_took_its_id_steps_down() -> None:
    """SIGSTOP past the TTL, a replacement claims the id, SIGCONT: both would run every request sent
    to that id. The older one stops serving instead, leaves the newer one's record alone, and says
    so on /catga/health; the newer one and its peers go on."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        peer = node(broker, "peer")
        await peer.start()
        process, old = await pausable_node(broker)
        process.freeze()
        await asyncio.sleep(TIMING["node_ttl"] + 2 * TIMING["heartbeat_interval"])
        new = virtual_node(broker, "pod-0", handlers=[count], **TIMING)
        await new.start()  # the old record lapsed: the id is free
        incarnation = new.node.view.self_info.incarnation
        await eventually(
            lambda: {n.node_id: n.incarnation for n in peer.node.nodes()}.get("pod-0") == incarnation,
            within=2,
        )
        runs.clear()
        for _ in range(3):  # reach both processes subscribed as pod-0: the old one reads them later
            await peer.mediator.send_to_node(Count(), "pod-0")
        # SIGCONT: the old process's overdue timers run before it reads what waited in its socket.
        process.thaw(backlog_after=0.5)
        await eventually(lambda: old.node.stopped, within=2 * TIMING["heartbeat_interval"] + 1)
        assert len(runs) == 3, "the old process ran what was sent to the id while it stood still"
        assert old.node.membership.replaced_by is not None
        assert old.node.membership.replaced_by.incarnation == incarnation
        health = old.node.health()
        assert health["status"] == "replaced" and health["replaced_by"]["incarnation"] == incarnation
        runs.clear()
        for _ in range(5):
            await peer.mediator.send_to_node(Count(), "pod-0")
        assert len(runs) == 5, "a request sent to the id ran on both processes"
        await asyncio.sleep(2 * TIMING["node_ttl"])  # the old one's stop deleted nothing
        held = read_record("pod-0", (await peer.node.transport.members.list())["pod-0"])
        assert held.incarnation == incarnation
        assert {n.node_id: n.incarnation for n in peer.node.nodes()}["pod-0"] == incarnation
        assert new.node.health()["status"] == "ok" and new.node.membership.replaced_by is None
        await old.stop()  # the lifespan's own stop, later: waits for the step-down, does nothing more
        for catga in (new, peer):
            await catga.stop()

    run_virtual(scenario())


def test_a_node_whose_record_the_broker_cannot_carry_says_which_setting_at_start() -> None:
    async def scenario() -> None:
        broker = InMemoryBroker(clock=asyncio.get_running_loop().time)
        big = virtual_node(broker, "pod-0", handlers=[workload], metadata={"blob": "x" * 2_000_000}, **TIMING)
        with pytest.raises(ConfigurationError, match="shorten CATGA_METADATA"):
            await big.start()
        assert broker.members.list("catga") == {}, "nothing was written"

    run_virtual(scenario())


def test_a_newer_record_under_the_id_that_is_never_refreshed_replaces_nobody() -> None:
    """A twin refused at start-up whose create went through leaves one record, never refreshed;
    a record from a clock no datetime holds is unreadable. The live node serves on, and its next
    heartbeat takes the record back."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        live = node(broker, "pod-0")
        await live.start()
        store = live.node.transport.members
        me = live.node.view.self_info
        later = me.started_at + timedelta(seconds=30)
        stray = me.model_copy(update={"incarnation": "f" * 16, "started_at": later, "last_seen": later})
        await store.put("pod-0", stray.model_dump_json().encode(), TIMING["node_ttl"])
        naive = stray.model_copy(update={"incarnation": "e" * 16}).model_dump_json()
        naive = naive.replace("Z", "").replace("+00:00", "")  # a record of no time zone
        await store.put("pod-0", naive.encode(), TIMING["node_ttl"])
        await asyncio.sleep(3 * TIMING["heartbeat_interval"])
        assert live.node.membership.replaced_by is None and live.node.health()["status"] == "ok"
        held = read_record("pod-0", (await store.list())["pod-0"])
        assert held.incarnation == me.incarnation, "the live node's heartbeat took its record back"
        assert await live.mediator.send(workload.Work()) == "?"
        await live.stop()

    run_virtual(scenario())


def test_a_process_frozen_past_the_ttl_holds_what_it_reads_until_its_id_is_its_own_again() -> None:
    """No replacement came, but a stray newer record did (a twin refused at start-up): held for
    a TTL while that record stays still, then the id is taken back and requests run again."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        peer = node(broker, "peer")
        await peer.start()
        process, old = await pausable_node(broker)
        me = old.node.view.self_info
        process.freeze()
        await asyncio.sleep(TIMING["node_ttl"] + 2 * TIMING["heartbeat_interval"])
        later = me.started_at + timedelta(seconds=30)
        stray = me.model_copy(update={"incarnation": "f" * 16, "started_at": later, "last_seen": later})
        await peer.node.transport.members.put("pod-0", stray.model_dump_json().encode(), 60)
        process.thaw(backlog_after=0.5)
        await eventually(lambda: old.node.membership.held, within=1)
        runs.clear()
        waiting = asyncio.create_task(peer.mediator.send_to_node(Count(), "pod-0", timeout=10))
        await eventually(lambda: not old.node.membership.held, within=TIMING["node_ttl"] + 2)
        assert await waiting == 1, "what arrived while it was held runs once its id is its own"
        assert old.node.membership.replaced_by is None
        held = read_record("pod-0", (await peer.node.transport.members.list())["pod-0"])
        assert held.incarnation == me.incarnation, "the stray record was taken back"
        await eventually(lambda: "pod-0" in {n.node_id for n in peer.node.nodes()}, within=2)
        runs.clear()
        assert await peer.mediator.send_to_node(Count(), "pod-0") == 1
        for catga in (old, peer):
            await catga.stop()

    run_virtual(scenario())
