"""docs/observability.md's walkthrough, done as it says: three processes of the example app with
``ORDERS_OBSERVE=1`` over a real nats-server, one trace across two nodes, ``/catga/metrics``, the
dashboard in headless Chromium while a node is killed, and ``python -m fastapi_catga nodes``.

The cluster starts once for the module; the test that kills node c runs last.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from example_app import spans as span_files
from example_app.orders import PlaceOrder
from fastapi_catga.cluster.routing import ConsistentHash
from fastapi_catga.core.nodes import NodeInfo
from tests.browser import chromium_page, handled, shown_nodes
from tests.multiprocess.harness import ROOT, AppNode
from tests.polling import wait_until
from tests.servers import NatsServer

pytestmark = [pytest.mark.multiprocess, pytest.mark.nats]

APP = "example_app.main:app"  # what the docs run: uvicorn example_app.main:app


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    with NatsServer() as server:  # the pip nats-server (2.15), as .venv/bin/nats-server in the docs
        yield server.url


@pytest.fixture(scope="module")
def spans_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spans")


@pytest.fixture(scope="module")
def cluster(nats_url: str, spans_dir: Path) -> Iterator[dict[str, AppNode]]:
    def env(name: str) -> dict[str, str]:
        return {
            "CATGA_TRANSPORT": "nats",
            "CATGA_NATS_URL": nats_url,
            "ORDERS_OBSERVE": "1",
            "ORDERS_SPANS_FILE": str(spans_dir / f"spans-{name}.jsonl"),
            "OTEL_BSP_SCHEDULE_DELAY": "200",  # write spans every 0.2 s (5 s by default)
        }

    nodes = {name: AppNode(name, env(name), app=APP) for name in "abc"}
    try:
        for node in nodes.values():
            node.start(wait=False)
        for node in nodes.values():
            node.wait_ready()
        wait_until(lambda: all(n.view() == {"a", "b", "c"} for n in nodes.values()), within=5)
        yield nodes
    finally:
        for node in nodes.values():
            node.close()


def order_on(node_id: str, cluster: dict[str, AppNode], prefix: str) -> str:
    """An order id that rendezvous hashing sends to ``node_id`` (every node handles PlaceOrder)."""
    members = [NodeInfo(node_id=name) for name in cluster]
    for n in range(1000):
        order = PlaceOrder(order_id=f"{prefix}-{n}", sku="kiwi", quantity=1)
        if ConsistentHash().choose(members, order, "a").node_id == node_id:
            return order.order_id
    raise AssertionError(f"no order id lands on {node_id}")


def place_order(node: AppNode, order_id: str, message_id: str) -> None:
    body = {"order_id": order_id, "sku": "kiwi", "quantity": 2, "message_id": message_id}
    response = node.post("/orders", json=body)
    assert response.status_code == 201, response.text


def test_docs_order_o_1_lands_on_b(cluster: dict[str, AppNode]) -> None:
    assert order_on("b", cluster, "o") == "o-1"  # the order the walkthrough places


def test_one_trace_from_the_http_request_on_a_to_the_handler_on_b(
    cluster: dict[str, AppNode], spans_dir: Path
) -> None:
    place_order(cluster["a"], order_on("b", cluster, "traced"), message_id="traced-order")
    files = sorted(spans_dir.glob("spans-*.jsonl"))

    found: list[list[dict[str, Any]]] = []

    def the_trace_is_written() -> bool:
        for spans in span_files.traces(span_files.load(files)).values():
            names = {(s["name"], span_files.node_of(s)) for s in spans}
            ids = {s["attributes"].get("messaging.message.id") for s in spans}
            if "traced-order" in ids and {("process PlaceOrder", "b"), ("POST /orders", "a")} <= names:
                found.append(spans)
                return True
        return False

    wait_until(the_trace_is_written, interval=0.1, within=10, message="the trace's spans written by a and b")
    spans = found[-1]
    by_name = {(s["name"], span_files.node_of(s)): s for s in spans}
    server = by_name["POST /orders", "a"]
    send = by_name["send PlaceOrder", "a"]
    attempt = by_name["send PlaceOrder attempt 1", "a"]
    process = by_name["process PlaceOrder", "b"]
    assert server["kind"] == "SpanKind.SERVER" and server["parent_id"] is None  # the trace starts here
    assert send["parent_id"] == server["context"]["span_id"]
    assert attempt["parent_id"] == send["context"]["span_id"]
    assert attempt["attributes"]["catga.target.node.id"] == "b"
    assert process["parent_id"] == attempt["context"]["span_id"]  # across the process boundary
    assert process["kind"] == "SpanKind.CONSUMER"
    assert {s["context"]["trace_id"] for s in spans} == {server["context"]["trace_id"]}
    # The order's event, published from a, is in the same trace wherever its handlers ran (a too).
    publish = by_name["publish OrderPlaced", "a"]
    assert publish["parent_id"] == server["context"]["span_id"]

    def processed_on() -> list[str]:
        trace = span_files.traces(span_files.load(files))[span_files.trace_id(server)]
        return sorted(
            span_files.node_of(s)
            for s in trace
            if s["name"] == "process OrderPlaced" and s["parent_id"] == publish["context"]["span_id"]
        )

    wait_until(lambda: processed_on() == ["a", "b", "c"], within=10, message="OrderPlaced on a, b and c")

    # The docs' command prints it as a tree.
    printed = subprocess.run(
        [sys.executable, "-m", "example_app.spans", *map(str, files), "--message", "traced-order"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=30,
    ).stdout  # fmt: skip
    assert printed.startswith(f"trace {span_files.trace_id(server)} (nodes a, b, c)\n"), printed
    assert (
        "\n      send PlaceOrder attempt 1  CLIENT  a -> b\n        process PlaceOrder  CONSUMER  b\n"
        in printed
    )


def metrics(node: AppNode) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = node.client.get("/catga/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(scraped: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_the_send_on_a_and_the_handler_run_on_b(cluster: dict[str, AppNode]) -> None:
    a, b = cluster["a"], cluster["b"]
    sent = {"type": "PlaceOrder", "operation": "send", "outcome": "ok"}
    handled = {"type": "PlaceOrder", "kind": "request", "outcome": "ok"}
    before_a, before_b = metrics(a), metrics(b)
    place_order(a, order_on("b", cluster, "counted"), message_id="counted-order")

    after_a = metrics(a)
    assert (
        value(after_a, "catga_messages_sent_total", **sent)
        == value(before_a, "catga_messages_sent_total", **sent) + 1
    )
    attempt_on_b = {"type": "PlaceOrder", "node": "b", "outcome": "ok"}
    assert (
        value(after_a, "catga_attempts_total", **attempt_on_b)
        == value(before_a, "catga_attempts_total", **attempt_on_b) + 1
    )
    assert value(after_a, "catga_send_duration_seconds_count", type="PlaceOrder", operation="send") >= 1
    wait_until(
        lambda: (
            value(metrics(b), "catga_messages_handled_total", **handled)
            == value(before_b, "catga_messages_handled_total", **handled) + 1
        ),
        within=5,
        message="the run counted on b",
    )
    for node in (a, b):
        scraped = metrics(node)
        assert value(scraped, "catga_cluster_size") == 3
        assert value(scraped, "catga_broker_connected") == 1


def test_the_cli_lists_the_live_nodes(cluster: dict[str, AppNode], nats_url: str) -> None:
    env = {"CATGA_TRANSPORT": "nats", "CATGA_NATS_URL": nats_url}
    done = subprocess.run(
        [sys.executable, "-m", "fastapi_catga", "nodes", "--json"],
        cwd=ROOT, env={**cluster["a"].env, **env}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    listed = {node["node_id"]: node for node in json.loads(done.stdout)}
    assert set(listed) == {"a", "b", "c"} == cluster["a"].view()
    assert listed["b"]["endpoint"] == cluster["b"].url
    assert "PlaceOrder" in listed["c"]["handles"]


def test_the_dashboard_shows_a_killed_node_grey_out_and_go(
    cluster: dict[str, AppNode], tmp_path: Path
) -> None:
    a, c = cluster["a"], cluster["c"]
    with chromium_page() as page:
        page.goto(f"{a.url}/catga/dashboard")
        wait_until(lambda: shown_nodes(page) == dict.fromkeys("abc", False), within=15, message="a, b, c")
        assert "nats connected" in page.locator("#status").inner_text()
        before = handled(page, "PlaceOrder")
        place_order(a, order_on("a", cluster, "shown"), message_id="shown-order")
        wait_until(lambda: handled(page, "PlaceOrder") == before + 1, within=5, message="counted on a")
        page.screenshot(path=tmp_path / "three-nodes.png")

        c.kill()
        wait_until(lambda: shown_nodes(page).get("c") is True, within=10, message="c greyed out")
        assert shown_nodes(page) == {"a": False, "b": False, "c": True}
        page.screenshot(path=tmp_path / "c-killed.png")
        wait_until(lambda: shown_nodes(page) == {"a": False, "b": False}, within=10, message="c gone")
        page.screenshot(path=tmp_path / "c-gone.png")
    assert all((tmp_path / name).stat().st_size > 0 for name in ("three-nodes.png", "c-killed.png"))
