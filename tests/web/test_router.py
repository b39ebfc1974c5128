"""`catga_router`: ``/catga/nodes``, ``/catga/nodes/current`` and ``/catga/health``."""

from __future__ import annotations

from fastapi.testclient import TestClient

from fastapi_catga import CatgaSettings, build
from fastapi_catga.testing import InMemoryBroker, InMemoryTransport
from tests.core import handlers_sample
from tests.web.apps import catga_app

# As docs/observability.md lists them: a dashboard reads each key before it is ever counted.
HEALTH_STATS = (
    "requests_handled", "handler_errors", "bad_requests", "expired_dropped", "deadline_cancelled",
    "busy_unanswered", "events_handled", "event_handler_errors", "bad_events", "held_dropped", "busy",
    "events_dropped", "in_flight", "events_waiting", "bad_frames",
)  # fmt: skip


def test_nodes_lists_every_live_node_this_one_first() -> None:
    broker = InMemoryBroker()
    peer = build(
        CatgaSettings(node_id="a-peer", endpoint="http://peer:8000"),
        handlers=[handlers_sample.upper],
        transport=InMemoryTransport(broker),
    )
    with TestClient(catga_app(transport=InMemoryTransport(broker))) as client:
        assert client.portal is not None
        client.portal.call(peer.start)
        try:
            nodes = client.get("/catga/nodes").json()
            current = client.get("/catga/nodes/current").json()
            health = client.get("/catga/health").json()
        finally:
            client.portal.call(peer.stop)
        after = client.get("/catga/nodes").json()
    assert [node["node_id"] for node in nodes] == ["web-node", "a-peer"]
    assert nodes[1]["endpoint"] == "http://peer:8000"
    assert nodes[1]["handles"] == ["SampleUpper"]
    assert current == nodes[0]
    assert current["handles"] == ["SampleDouble", "SampleUpper"]
    assert health["members"] == 2
    assert [node["node_id"] for node in after] == ["web-node"]  # the peer left on stop


def test_health_is_503_while_the_broker_is_down() -> None:
    broker = InMemoryBroker()
    with TestClient(catga_app(transport=InMemoryTransport(broker))) as client:
        ok = client.get("/catga/health")
        assert ok.status_code == 200
        assert client.head("/catga/health").status_code == 200  # a load balancer's probe
        assert ok.json()["stats"] == dict.fromkeys(HEALTH_STATS, 0), "every counter, from zero"
        assert ok.json() | {"stats": {}} == {
            "status": "ok",
            "transport": "memory",
            "connected": True,
            "node_id": "web-node",
            "members": 1,
            "view_stale": False,
            "replaced_by": None,
            "stats": {},
        }
        assert client.portal is not None
        client.portal.call(broker.outage)
        down = client.get("/catga/health")
        assert down.status_code == 503
        assert client.head("/catga/health").status_code == 503
        assert down.json()["connected"] is False
        assert down.json()["status"] == "unavailable"
        assert down.json()["view_stale"] is True
        client.portal.call(broker.restore)
        assert client.get("/catga/health").status_code == 200
