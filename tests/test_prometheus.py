"""PrometheusObserver counts what a node does; ``GET /catga/metrics`` serves it (in-memory app, then a
2-node cluster over a real nats-server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from fastapi_catga import Catga, CatgaSettings, Command, RemoteHandlerError, RequestTimeoutError, build
from fastapi_catga.prometheus import PrometheusObserver
from tests.polling import eventually
from tests.servers import NatsServer
from tests.web.apps import catga_app


class Charge(Command[str]):
    amount: int


async def charge(command: Charge) -> str:
    if command.amount == 999:  # slow: its caller's deadline passes first
        await asyncio.sleep(5)
    if command.amount < 0:
        raise ValueError("negative amount")
    return "ok"


def value(observer: PrometheusObserver, name: str, **labels: str) -> float:
    found = observer.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def test_the_metrics_route_serves_the_observers_registry() -> None:
    registry = CollectorRegistry()
    observer = PrometheusObserver(registry)
    with TestClient(catga_app(observers=[observer])) as client:
        assert client.get("/double/4").json() == 8
        answer = client.get("/catga/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    text = answer.text
    assert 'catga_messages_sent_total{operation="send",outcome="ok",type="SampleDouble"} 1.0' in text
    assert 'catga_messages_handled_total{kind="request",outcome="ok",type="SampleDouble"} 1.0' in text
    assert 'catga_handler_duration_seconds_count{type="SampleDouble"} 1.0' in text
    assert "catga_cluster_size 1.0" in text
    assert "catga_broker_connected 1.0" in text
    assert (
        registry.get_sample_value(
            "catga_attempts_total", {"type": "SampleDouble", "node": "web-node", "outcome": "ok"}
        )
        == 1
    )


def test_without_a_metrics_observer_the_route_is_not_found() -> None:
    with TestClient(catga_app()) as client:
        assert client.get("/catga/metrics").status_code == 404


@pytest.fixture
async def pair(nats_server: NatsServer) -> AsyncIterator[list[tuple[Catga, PrometheusObserver]]]:
    """Nodes ``a`` and ``b`` over NATS, both handling Charge, each with its own observer."""
    nodes = []
    for name in ("a", "b"):
        observer = PrometheusObserver()
        settings = CatgaSettings(transport="nats", nats_url=nats_server.url, cluster="metrics", node_id=name)
        nodes.append((build(settings, handlers=[charge], observers=[observer]), observer))
        await nodes[-1][0].start()
    try:
        await eventually(lambda: all(len(c.node.view.nodes()) == 2 for c, _ in nodes), within=5)
        yield nodes
    finally:
        for catga, _ in nodes:
            await catga.stop()


async def test_counters_move_across_a_cluster_with_a_failure_and_a_failover(
    pair: list[tuple[Catga, PrometheusObserver]],
) -> None:
    (a, metrics_a), (b, metrics_b) = pair
    assert value(metrics_a, "catga_cluster_size") == 2
    assert value(metrics_a, "catga_joins_total") == 1
    for _ in range(4):  # round robin: two run on b
        assert await a.mediator.send(Charge(amount=1)) == "ok"
    with pytest.raises(RemoteHandlerError):
        await a.mediator.send_to_node(Charge(amount=-1), "b")
    sent_ok = value(metrics_a, "catga_messages_sent_total", type="Charge", operation="send", outcome="ok")
    assert sent_ok == 4
    assert (
        value(
            metrics_a, "catga_messages_sent_total", type="Charge", operation="send", outcome="handler_error"
        )
        == 1
    )
    assert value(metrics_b, "catga_messages_handled_total", type="Charge", kind="request", outcome="ok") == 2
    assert value(metrics_b, "catga_messages_failed_total", type="Charge", outcome="handler_error") == 1
    assert value(metrics_a, "catga_send_duration_seconds_count", type="Charge", operation="send") == 5
    assert value(metrics_a, "catga_attempts_total", type="Charge", node="b", outcome="ok") == 2
    with pytest.raises(RequestTimeoutError):  # the run there is cancelled at the deadline: a timeout
        await a.mediator.send_to_node(Charge(amount=999), "b", timeout=1.0)
    handled_timeout = {"type": "Charge", "kind": "request", "outcome": "timeout"}
    await eventually(
        lambda: value(metrics_b, "catga_messages_handled_total", **handled_timeout) == 1, within=3
    )

    await b.node.responder.stop(drain_timeout=0)  # b still a member, no longer listening
    for _ in range(2):
        assert await a.mediator.send(Charge(amount=1)) == "ok"
    assert value(metrics_a, "catga_failovers_total", type="Charge") == 1
    assert value(metrics_a, "catga_attempts_total", type="Charge", node="b", outcome="no_responder") == 1
    assert value(metrics_a, "catga_in_flight", side="send") == 0

    await b.stop()
    await eventually(lambda: value(metrics_a, "catga_cluster_size") == 1, within=5)
    assert value(metrics_a, "catga_leaves_total") == 1
    nodes = {
        s.labels["node"]
        for m in metrics_a.registry.collect()
        if m.name == "catga_attempts"
        for s in m.samples
    }
    assert "b" not in nodes, "a node that left takes its series along (new ids on each restart)"


def test_overload_is_counted_by_type_and_outcome() -> None:
    observer = PrometheusObserver()
    observer.overloaded("Charge", "busy")
    observer.overloaded("Charge", "busy")
    observer.overloaded("Tick", "dropped")
    assert value(observer, "catga_overloaded_total", type="Charge", outcome="busy") == 2
    assert value(observer, "catga_overloaded_total", type="Tick", outcome="dropped") == 1


def test_an_attempt_that_ends_after_its_node_left_adds_no_series_of_it() -> None:
    observer = PrometheusObserver()
    observer.attempt_ended(None, Charge(amount=1), "vm-1", 1, None)
    observer.member_left("vm-1", 1, evicted=True)
    observer.attempt_ended(None, Charge(amount=1), "vm-1", 1, TimeoutError())  # in flight as it left
    assert value(observer, "catga_attempts_total", type="Charge", node="vm-1", outcome="ok") == 0
    assert value(observer, "catga_attempts_total", type="Charge", node="gone", outcome="timeout") == 1
    observer.member_joined("vm-1", 2)  # back (a stable node id): its own series again
    observer.attempt_ended(None, Charge(amount=1), "vm-1", 1, None)
    assert value(observer, "catga_attempts_total", type="Charge", node="vm-1", outcome="ok") == 1
