"""A whole cluster in one process on the in-memory broker: membership, routing, failover."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import ClassVar

import pytest

from fastapi_catga import (
    CatgaError,
    Command,
    ConfigurationError,
    Event,
    HandlerNotFoundError,
    NodeUnavailableError,
    RemoteHandlerError,
    RequestTimeoutError,
    TransportError,
)
from fastapi_catga.testing import InMemoryBroker, InMemoryTransport
from tests.cluster import workload
from tests.cluster.conftest import StartNode, ids
from tests.cluster.workload import Happened, Nobody, Sticky, Work
from tests.polling import eventually


def transport_of(node: object) -> InMemoryTransport:
    transport = node.node.transport  # type: ignore[attr-defined]
    assert isinstance(transport, InMemoryTransport)
    return transport


async def test_three_nodes_see_each_other_and_a_late_joiner_sees_all_at_once(start_node: StartNode) -> None:
    a, b, c = await start_node("a"), await start_node("b"), await start_node("c")
    await eventually(lambda: all(ids(n.node.nodes()) == {"a", "b", "c"} for n in (a, b, c)), within=1)
    late = await start_node("late")
    assert ids(await late.mediator.get_nodes()) == {"a", "b", "c", "late"}  # before any wait
    assert (await late.mediator.get_current_node()).node_id == "late"
    await eventually(lambda: "late" in ids(a.node.nodes()), within=1)
    info = {n.node_id: n for n in await a.mediator.get_nodes()}
    assert info["late"].handles == ["Flaky", "Sticky", "Work"]
    assert info["late"].events == ["Happened"]


async def test_send_spreads_over_nodes_and_send_to_node_hits_the_named_one(start_node: StartNode) -> None:
    a, _b, _c = await start_node("a"), await start_node("b"), await start_node("c")
    await eventually(lambda: len(a.node.nodes()) == 3, within=1)
    served = Counter([await a.mediator.send(Work()) for _ in range(30)])
    assert set(served) == {"a", "b", "c"}
    assert min(served.values()) >= 5
    assert await a.mediator.send_to_node(Work(), "c") == "c"
    with pytest.raises(NodeUnavailableError, match="unknown or dead"):
        await a.mediator.send_to_node(Work(), "no-such-node")


async def test_routing_key_is_sticky(start_node: StartNode) -> None:
    a, _, _ = await start_node("a"), await start_node("b"), await start_node("c")
    await eventually(lambda: len(a.node.nodes()) == 3, within=1)
    for key in ("customer-1", "customer-2", "customer-3"):
        assert len({await a.mediator.send(Sticky(key=key)) for _ in range(10)}) == 1


async def test_broadcast_gathers_one_answer_per_node(start_node: StartNode) -> None:
    a, _, _ = await start_node("a"), await start_node("b"), await start_node("c")
    await eventually(lambda: len(a.node.nodes()) == 3, within=1)
    answers = await a.mediator.broadcast(Work())
    assert answers == {"a": "a", "b": "b", "c": "c"}


async def test_broadcast_reports_nodes_without_the_handler(start_node: StartNode) -> None:
    a = await start_node("a")
    await start_node("bare", handlers=[])
    await eventually(lambda: len(a.node.nodes()) == 2, within=1)
    answers = await a.mediator.broadcast(Work())
    assert answers["a"] == "a"
    assert isinstance(answers["bare"], HandlerNotFoundError)


async def test_a_type_no_handler_could_register_is_refused_at_send_and_publish(start_node: StartNode) -> None:
    """Its name would be no subject on NATS: refused at once, as registering a handler for it is."""

    class Spaced(Command[str]):
        type_name: ClassVar[str] = "has space"

    class SpacedEvent(Event):
        type_name: ClassVar[str] = "has space too"

    a = await start_node("a")
    with pytest.raises(ConfigurationError, match="'has space'"):
        await a.mediator.send(Spaced())
    with pytest.raises(ConfigurationError, match="'has space too'"):
        await a.mediator.publish(SpacedEvent())
    assert await a.mediator.send(Work()) == "a"


async def test_publish_runs_every_handler_on_every_node(start_node: StartNode) -> None:
    a, _, _ = await start_node("a"), await start_node("b"), await start_node("c")
    await eventually(lambda: len(a.node.nodes()) == 3, within=1)
    event = Happened(what="x")
    await a.mediator.publish(event)
    expected = {(n, event.message_id) for n in ("a", "a/2", "b", "b/2", "c", "c/2")}
    await eventually(lambda: expected <= set(workload.events_seen), within=1)
    assert Counter(e for e in workload.events_seen if e[1] == event.message_id) == Counter(expected)


async def test_a_broker_that_does_not_take_an_event_fails_the_publish_at_the_deadline(
    start_node: StartNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, _ = await start_node("a", request_timeout=0.2), await start_node("b")
    await eventually(lambda: len(a.node.nodes()) == 2, within=1)

    async def stuck(subject: str, envelope: object) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(transport_of(a), "publish", stuck)
    event = Happened(what="x")
    started = time.monotonic()
    with pytest.raises(
        TransportError, match=r"did not confirm Happened .* within 0.2 s; it may still be delivered"
    ):
        await a.mediator.publish(event)
    assert 0.2 <= time.monotonic() - started < 1.0
    assert {("a", event.message_id), ("a/2", event.message_id)} <= set(workload.events_seen)  # ran here


async def test_graceful_stop_leaves_every_view_and_sends_keep_working(start_node: StartNode) -> None:
    a, b, c = await start_node("a"), await start_node("b"), await start_node("c")
    await eventually(lambda: len(a.node.nodes()) == 3, within=1)
    await c.stop()
    await eventually(lambda: ids(a.node.nodes()) == ids(b.node.nodes()) == {"a", "b"}, within=1)
    assert {await a.mediator.send(Work()) for _ in range(10)} == {"a", "b"}


async def test_crashed_node_fails_over_at_once_and_is_evicted_after_the_ttl(start_node: StartNode) -> None:
    a, _b, c = await start_node("a"), await start_node("b"), await start_node("c")
    await eventually(lambda: len(a.node.nodes()) == 3, within=1)
    transport_of(c).crash()
    started = time.monotonic()
    results = [await a.mediator.send(Work()) for _ in range(20)]
    assert "c" not in results
    assert time.monotonic() - started < 1.0  # no-responder switches at once, no timeouts waited
    eviction = await eventually(lambda: ids(a.node.nodes()) == {"a", "b"}, within=0.6 + 1.0)
    assert eviction <= 0.6 + 1.0


async def test_paused_node_times_out_and_the_request_succeeds_elsewhere(start_node: StartNode) -> None:
    a, _, c = await start_node("a"), await start_node("b"), await start_node("c")
    await eventually(lambda: len(a.node.nodes()) == 3, within=1)
    transport_of(c).pause()
    results = [await a.mediator.send(Work(), timeout=1.5) for _ in range(6)]
    assert "c" not in results  # each attempt that hit c timed out and went elsewhere
    dropped_before = c.node.responder.stats["expired_dropped"]
    transport_of(c).resume()
    await eventually(lambda: c.node.responder.stats["expired_dropped"] > dropped_before, within=1)
    assert not any(node == "c" for node, _ in workload.executions)  # the stale requests never ran


async def test_no_capable_node_gives_a_typed_error_fast(start_node: StartNode) -> None:
    a = await start_node("a", handlers=[])
    started = time.monotonic()
    with pytest.raises(HandlerNotFoundError):
        await a.mediator.send(Nobody())
    b = await start_node("b")
    await eventually(lambda: len(a.node.nodes()) == 2, within=1)
    transport_of(b).crash()
    with pytest.raises(NodeUnavailableError):
        await a.mediator.send(Work())
    assert time.monotonic() - started < 0.5


async def test_deadline_bounds_a_send_to_a_hung_cluster(start_node: StartNode) -> None:
    a = await start_node("a", handlers=[])
    b = await start_node("b")
    await eventually(lambda: len(a.node.nodes()) == 2, within=1)
    transport_of(b).pause()
    started = time.monotonic()
    with pytest.raises(RequestTimeoutError):
        await a.mediator.send(Work(), timeout=0.5)
    assert 0.45 < time.monotonic() - started < 1.0


async def test_handler_error_is_not_retried_and_retryable_error_is(start_node: StartNode) -> None:
    a, _ = await start_node("a", handlers=[]), await start_node("b")
    await eventually(lambda: len(a.node.nodes()) == 2, within=1)
    with pytest.raises(CatgaError, match="busy") as info:
        await a.mediator.send(workload.Flaky())
    assert info.value.node_id == "b"
    assert not isinstance(info.value, RemoteHandlerError) or info.value.retryable


async def test_broker_outage_freezes_views_and_recovery_resyncs(
    broker: InMemoryBroker, start_node: StartNode
) -> None:
    a, b = await start_node("a"), await start_node("b")
    await eventually(lambda: len(a.node.nodes()) == 2, within=1)
    broker.outage()
    assert a.node.view.stale and b.node.view.stale
    assert a.node.health()["status"] == "unavailable"
    # Far longer than the TTL with no heartbeats: frozen views evict nobody, checked all along.
    deadline = time.monotonic() + 3 * 0.6
    while time.monotonic() < deadline:
        assert ids(a.node.nodes()) == ids(b.node.nodes()) == {"a", "b"}
        await asyncio.sleep(0.05)
    broker.restore()
    await eventually(lambda: not a.node.view.stale and not b.node.view.stale, within=1)
    assert ids(a.node.nodes()) == {"a", "b"}
    assert await a.mediator.send_to_node(Work(), "b") == "b"


async def test_a_send_during_a_broker_blip_waits_for_the_broker_and_succeeds(
    broker: InMemoryBroker, start_node: StartNode
) -> None:
    a, _ = await start_node("a", handlers=[]), await start_node("b")
    await eventually(lambda: len(a.node.nodes()) == 2, within=1)
    broker.outage()
    sending = asyncio.create_task(a.mediator.send(Work(), timeout=2.0))
    await eventually(lambda: a.node.view.stale, within=1)
    assert not sending.done()
    broker.restore()
    assert await sending == "b"
    assert not a.node.view.is_suspect("b")  # the outage was nobody's fault


async def test_a_send_during_a_long_outage_fails_by_its_deadline(
    broker: InMemoryBroker, start_node: StartNode
) -> None:
    a, _ = await start_node("a", handlers=[]), await start_node("b")
    await eventually(lambda: len(a.node.nodes()) == 2, within=1)
    broker.outage()
    started = time.monotonic()
    with pytest.raises(TransportError):
        await a.mediator.send(Work(), timeout=0.5)
    assert 0.4 < time.monotonic() - started < 1.0
