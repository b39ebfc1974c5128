"""Membership under faults that come from the process itself, on a virtual clock: stalls, and bugs."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from fastapi_catga import Catga
from fastapi_catga.testing import InMemoryBroker
from fastapi_catga.transports.base import MemberEvent
from tests.cluster import workload
from tests.cluster.process_transport import ProcessTransport
from tests.virtual_time import run_virtual, stall, virtual_node

TIMING: dict[str, Any] = {"heartbeat_interval": 1.0, "node_ttl": 3.0}


def node(broker: InMemoryBroker, node_id: str) -> Catga:
    return virtual_node(broker, node_id, handlers=[workload], **TIMING)


@pytest.mark.parametrize(("seconds", "distrusted"), [(0.9, False), (5.0, True)])
def test_a_stall_shorter_than_a_heartbeat_leaves_the_view_alone(
    caplog: pytest.LogCaptureFixture, seconds: float, distrusted: bool
) -> None:
    async def scenario() -> None:
        broker = InMemoryBroker(clock=asyncio.get_running_loop().time)
        a, b = node(broker, "a"), node(broker, "b")
        await a.start()
        await b.start()
        await asyncio.sleep(2.3)
        stall(seconds)  # the whole process (both nodes) stands still
        for _ in range(30):
            await asyncio.sleep(0.1)
            assert {n.node_id for n in a.node.nodes()} == {"a", "b"}, "nobody evicted for our own stall"
        assert a.node.health()["status"] == "ok"
        for catga in (a, b):
            await catga.stop()

    run_virtual(scenario())
    assert ("was frozen for" in caplog.text) is distrusted


def test_a_membership_loop_survives_an_unexpected_error(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        broker = InMemoryBroker(clock=asyncio.get_running_loop().time)
        a, b = node(broker, "a"), node(broker, "b")
        await a.start()
        await b.start()
        store = b.node.transport.members
        real_put, failures = store.put, iter([RuntimeError("a bug")])

        async def put(node_id: str, value: bytes, ttl: float) -> None:
            error = next(failures, None)
            if error is not None:
                raise error
            await real_put(node_id, value, ttl)

        store.put = put  # type: ignore[method-assign]
        await asyncio.sleep(10)  # the failed heartbeat is retried; b lives on in a's view
        assert b.node.membership.failures["heartbeat"] == 1
        assert {n.node_id for n in a.node.nodes()} == {"a", "b"}
        for catga in (a, b):
            await catga.stop()

    run_virtual(scenario())
    assert "the heartbeat loop failed" in caplog.text


def test_a_distrust_that_comes_while_a_resync_runs_gets_a_resync_of_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fastapi_catga.cluster.membership")

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        # Each membership call of a takes 50 ms, so a resync takes about 0.2 s.
        a = virtual_node(
            broker, "a", handlers=[workload], transport=ProcessTransport(broker, latency=0.05), **TIMING
        )
        await a.start()
        membership = a.node.membership
        membership._distrust_view("the first reason")
        await asyncio.sleep(0.1)
        membership._distrust_view("a second reason, after the resync read some of the store")
        await asyncio.sleep(0.15)  # the first resync is done by now...
        assert a.node.health()["view_stale"], "...but it began before the second reason: still frozen"
        await asyncio.sleep(0.5)
        assert not a.node.health()["view_stale"]
        await a.stop()

    run_virtual(scenario())
    assert caplog.text.count("view frozen until a resync") == 1
    assert caplog.text.count("node a resynced") == 1


def test_a_connection_lost_as_a_resync_ends_keeps_the_outages_grace_for_the_next_one() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        a = node(broker, "a")
        # b is slow to come back: each of its membership calls takes 0.4 s
        b = virtual_node(
            broker, "b", handlers=[workload], transport=ProcessTransport(broker, latency=0.4), **TIMING
        )
        await a.start()
        await b.start()
        store = a.node.transport.members
        real_list = store.list

        async def list_then_lose_the_broker() -> dict[str, bytes]:
            records = await real_list()
            store.list = real_list  # type: ignore[method-assign]
            broker.outage()  # the answer was in; the connection drops before the resync returns
            return records

        store.list = list_then_lose_the_broker  # type: ignore[method-assign]
        a.node.membership._distrust_view("a test asks for a resync")
        await asyncio.sleep(0.1)
        await asyncio.sleep(0.8 * TIMING["node_ttl"])  # nobody heartbeats through the outage
        broker.restore()
        await asyncio.sleep(0.5)  # a resynced; b gets a full TTL to show up, and does
        assert not a.node.health()["view_stale"]
        for _ in range(40):
            await asyncio.sleep(0.1)
            assert {n.node_id for n in a.node.nodes()} == {"a", "b"}, "b was not evicted for the outage"
        for catga in (a, b):
            await catga.stop()

    run_virtual(scenario())


@pytest.mark.parametrize("crash", [True, False])
def test_records_that_lapse_as_the_broker_comes_back_evict_nobody_within_a_ttl(crash: bool) -> None:
    """A broker frozen past the TTL expires the records it holds as it resumes, after the nodes
    have resynced (seen on nats-server 2.11+): those deletes are the outage's, not departures."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        a, b = node(broker, "a"), node(broker, "b")
        for catga in (a, b):
            await catga.start()
        broker.outage()
        await asyncio.sleep(2 * TIMING["node_ttl"])
        broker.restore()
        await asyncio.sleep(0.5)
        assert not a.node.health()["view_stale"]
        a.node.membership._apply(MemberEvent("delete", "b", expired=True), loop.time())  # the late expiry
        for _ in range(20):
            await asyncio.sleep(0.1)
            assert {n.node_id for n in a.node.nodes()} == {"a", "b"}, "b evicted for the outage"
        if not crash:  # b leaves: its own delete drops it at once, grace or not
            await b.stop()
            assert [n.node_id for n in a.node.nodes()] == ["a"]
            await a.stop()
            return
        b.node.transport.crash()  # type: ignore[attr-defined]  # b really dies now: the sweep evicts it within a TTL or so
        for _ in range(50):
            await asyncio.sleep(0.1)
            if [n.node_id for n in a.node.nodes()] == ["a"]:
                break
        assert [n.node_id for n in a.node.nodes()] == ["a"]
        await a.stop()

    run_virtual(scenario())
