"""`catga_dashboard_router`: the page, and the snapshots it gets over Server-Sent Events."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from fastapi_catga import CatgaSettings, DashboardObserver, catga_dashboard_router
from fastapi_catga.web.dashboard import TypeCounts, _type_rows, snapshots
from tests.core.handlers_sample import SampleDouble
from tests.web.apps import catga_app


def dashboard_app(**options: Any) -> FastAPI:
    app = catga_app(settings=CatgaSettings(node_id="dash-node", metadata={"zone": "z1"}), **options)
    app.include_router(catga_dashboard_router)
    return app


def read_events(client: TestClient, query: str) -> list[dict[str, Any]]:
    response = client.get(f"/catga/dashboard/events?{query}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.startswith("retry: 1000\n\n")
    return [
        json.loads(line[len("data: ") :]) for line in response.text.splitlines() if line.startswith("data: ")
    ]


def test_the_page_is_one_self_contained_html_file() -> None:
    with TestClient(dashboard_app()) as client:
        response = client.get("/catga/dashboard")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert 'new EventSource("dashboard/events")' in page
    assert "http://" not in page and "https://" not in page  # nothing from a CDN: works offline


def test_a_snapshot_shows_the_nodes_and_the_broker_state() -> None:
    with TestClient(dashboard_app()) as client:
        snapshots = read_events(client, "interval=0.05&seconds=0.12")
    assert 2 <= len(snapshots) <= 4
    first = snapshots[0]
    assert first["node_id"] == "dash-node"
    assert first["cluster"] == "catga"
    assert first["broker"] == {"transport": "memory", "connected": True, "view_stale": False}
    [node] = first["nodes"]
    assert node["node_id"] == "dash-node"
    assert node["metadata"] == {"zone": "z1"}
    assert "SampleDouble" in node["handles"]
    assert node["uptime"] >= 0 and node["heartbeat_age"] >= 0
    assert first["types"] is None  # no DashboardObserver installed


def test_with_an_observer_it_counts_handled_and_failed_per_type() -> None:
    observer = DashboardObserver()
    with TestClient(dashboard_app(observers=[observer])) as client:
        for value in range(3):
            assert client.get(f"/double/{value}").json() == value * 2
        [snapshot] = read_events(client, "interval=1&seconds=0.5")
    assert {
        key: value for key, value in snapshot["types"][0].items() if key in ("type", "handled", "failed")
    } == {"type": "SampleDouble", "handled": 3, "failed": 0}
    assert observer.counts["SampleDouble"].handled == 3


def test_rates_are_per_second_over_the_last_interval() -> None:
    counts = {"A": TypeCounts(handled=30, failed=4), "B": TypeCounts(handled=2)}
    rows = _type_rows(counts, {"A": (10, 2)}, seconds=2.0)
    assert rows == [
        {"type": "A", "handled": 30, "failed": 4, "handled_rate": 10.0, "failed_rate": 1.0},
        {"type": "B", "handled": 2, "failed": 0, "handled_rate": 1.0, "failed_rate": 0.0},
    ]
    assert _type_rows(counts, {}, seconds=0.0)[0]["handled_rate"] == 0.0


async def test_the_stream_ends_when_the_node_stops() -> None:
    app = dashboard_app()
    with TestClient(app):
        catga = app.state.fastapi_catga
    assert catga.node.stopped
    assert [chunk async for chunk in snapshots(catga, 0.05, 10)] == ["retry: 1000\n\n"]


def test_bad_query_values_are_rejected() -> None:
    with TestClient(dashboard_app()) as client:
        assert client.get("/catga/dashboard/events?interval=0").status_code == 422
        assert client.get("/catga/dashboard/events?seconds=0").status_code == 422
        assert client.get("/catga/dashboard/events?seconds=3600").status_code == 422  # would hold a shutdown


def test_the_observer_counts_a_failed_run_as_handled_and_failed() -> None:
    observer = DashboardObserver()
    observer.handle_ended(None, SampleDouble(value=1), 0.01, None)
    observer.handle_ended(None, SampleDouble(value=2), 0.01, RuntimeError("boom"))
    assert observer.counts == {"SampleDouble": TypeCounts(handled=2, failed=1)}
