"""The example app (the README's code) end to end: orders, events, broadcast and the catga routes."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from example_app import orders
from example_app.main import app as example_app
from fastapi_catga.web.dependencies import STATE_KEY


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    for name in [name for name in os.environ if name.startswith("CATGA_")]:
        monkeypatch.delenv(name)  # the example's defaults: in-memory transport, a fresh node id
    with TestClient(example_app) as client:
        yield client


def test_example_app_places_and_reads_an_order(client: TestClient) -> None:
    reserved = orders.stock_reserved["kiwi"]
    response = client.post("/orders", json={"sku": "kiwi", "quantity": 3})
    assert response.status_code == 201
    order = response.json()
    assert order == {"order_id": order["order_id"], "sku": "kiwi", "quantity": 3, "status": "placed"}

    response = client.get(f"/orders/{order['order_id']}")
    assert response.status_code == 200
    assert response.json() == order
    # The OrderPlaced event reached both of its handlers.
    assert orders.stock_reserved["kiwi"] == reserved + 3
    assert f"order {order['order_id']}: 3 x kiwi confirmed" in orders.notifications


def test_example_app_unknown_order_is_404(client: TestClient) -> None:
    response = client.get("/orders/no-such-order")
    assert response.status_code == 404
    assert response.json() == {"detail": "no order no-such-order"}


def test_example_app_invalid_body_is_422_with_field_errors(client: TestClient) -> None:
    response = client.post("/orders", json={"sku": "", "quantity": 0})
    assert response.status_code == 422
    errors = {tuple(error["loc"]): error["type"] for error in response.json()["detail"]}
    assert errors == {("body", "sku"): "string_too_short", ("body", "quantity"): "greater_than"}


def test_example_app_stats_counts_per_node(client: TestClient) -> None:
    node_id = client.get("/catga/nodes/current").json()["node_id"]
    before = client.get("/stats").json()[node_id]
    assert client.post("/orders", json={"sku": "fig", "quantity": 1}).status_code == 201
    after = client.get("/stats").json()
    assert list(after) == [node_id]
    assert after[node_id]["PlaceOrder"] == before.get("PlaceOrder", 0) + 1
    assert after[node_id]["OrderPlaced"] == before.get("OrderPlaced", 0) + 2  # two handlers
    assert after[node_id]["GetStats"] == before.get("GetStats", 0) + 1


def test_example_app_catga_routes(client: TestClient) -> None:
    nodes = client.get("/catga/nodes")
    assert nodes.status_code == 200
    [node] = nodes.json()
    assert client.get("/catga/nodes/current").json() == node
    assert node["handles"] == ["GetOrder", "GetStats", "PlaceOrder"]
    assert node["events"] == ["OrderPlaced"]
    assert set(node) >= {"node_id", "endpoint", "last_seen", "metadata"}

    health = client.get("/catga/health")
    assert health.status_code == 200
    assert health.json() | {"stats": {}} == {
        "status": "ok",
        "transport": "memory",
        "connected": True,
        "node_id": node["node_id"],
        "members": 1,
        "view_stale": False,
        "replaced_by": None,
        "stats": {},
    }


@pytest.mark.parametrize("order_id", ["", "a/b", "x" * 65, "a b"])
def test_the_example_refuses_an_order_id_that_could_not_be_read_back(
    client: TestClient, order_id: str
) -> None:
    response = client.post("/orders", json={"order_id": order_id, "sku": "apple", "quantity": 1})
    assert response.status_code == 422
    assert client.get("/orders/a%20b").status_code == 422
    placed = client.post("/orders", json={"order_id": "o-1", "sku": "apple", "quantity": 1})
    assert client.get(f"/orders/{placed.json()['order_id']}").json()["order_id"] == "o-1"


def test_an_order_placed_while_its_event_cannot_go_out_is_still_placed(client: TestClient) -> None:
    """The broker goes down between the send (run here, in-process) and the publish: the client is
    told the order is placed, as it is; a 503 would make it retry, and place it twice."""
    catga = getattr(client.app.state, STATE_KEY)  # type: ignore[attr-defined]
    assert client.portal is not None
    client.portal.call(catga.node.transport.broker.outage)
    try:
        response = client.post("/orders", json={"sku": "fig", "quantity": 1})
        assert response.status_code == 201
        assert client.get(f"/orders/{response.json()['order_id']}").status_code == 200
    finally:
        client.portal.call(catga.node.transport.broker.restore)


def test_a_lone_surrogate_in_a_clients_json_is_a_422_not_a_500(client: TestClient) -> None:
    """FastAPI's own 422 echoes the input, and failed to write one holding a lone surrogate: the
    lifespan puts the same answer, written so that it cannot fail, in place of FastAPI's handler."""
    body = b'{"sku": "\\ud800", "quantity": 1}'
    response = client.post("/orders", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "sku"]
