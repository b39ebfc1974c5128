"""The example app's observability switch (``ORDERS_OBSERVE=1``): off by default, and where spans go.

The three-node walkthrough of docs/observability.md is tests/multiprocess/test_observability.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from example_app import observability, spans
from tests.servers import free_port


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ORDERS_OBSERVE", "ORDERS_SPANS_FILE", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)


def test_switched_off_it_installs_nothing() -> None:
    app = FastAPI()
    assert observability.observers() == []
    observability.instrument(app)
    assert app.user_middleware == []
    assert [getattr(r, "path", "") for r in app.routes] == [getattr(r, "path", "") for r in FastAPI().routes]


def test_switched_on_it_traces_counts_and_serves_the_dashboard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDERS_OBSERVE", "1")
    recorded = InMemorySpanExporter()
    provider = TracerProvider()  # not the global one
    provider.add_span_processor(SimpleSpanProcessor(recorded))
    monkeypatch.setattr(observability, "tracer_provider", lambda: provider)
    names = [type(o).__name__ for o in observability.observers()]
    assert names == ["TracingObserver", "PrometheusObserver", "DashboardObserver"]
    app = FastAPI()

    @app.get("/hello")
    def hello() -> str:
        return "hello"

    observability.instrument(app)
    client = TestClient(app)
    assert client.get("/hello").status_code == 200
    assert client.get("/catga/dashboard").headers["content-type"].startswith("text/html")
    assert [(s.name, s.kind) for s in recorded.get_finished_spans()] == [("GET /hello", SpanKind.SERVER)]


def export_one_span(name: str) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(observability.exporter()))
    with provider.get_tracer("test").start_as_current_span(name):
        pass
    provider.shutdown()


def test_spans_go_to_the_file_as_json_lines(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ORDERS_SPANS_FILE", str(tmp_path / "spans.jsonl"))
    export_one_span("first")
    export_one_span("second")
    written = spans.load([tmp_path / "spans.jsonl"])
    assert [span["name"] for span in written] == ["first", "second"]
    assert all(json.loads(line) for line in (tmp_path / "spans.jsonl").read_text().splitlines())


class _Collector(BaseHTTPRequestHandler):
    received: list[tuple[str, str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, self.headers["Content-Type"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", free_port()), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_spans_go_to_an_otlp_collector_when_its_endpoint_is_set(
    monkeypatch: pytest.MonkeyPatch, collector: str
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector)
    _Collector.received.clear()
    export_one_span("exported")
    assert _Collector.received == [("/v1/traces", "application/x-protobuf")]


def test_the_spans_command_prints_a_trace_as_a_tree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def span(name: str, span_id: str, parent: str | None, node: str, **extra: str) -> str:
        return json.dumps({
            "name": name, "kind": "SpanKind.CLIENT", "parent_id": parent, "start_time": span_id,
            "context": {"trace_id": "0xabc", "span_id": span_id},
            "attributes": {"catga.node.id": node, **extra}, "status": {"status_code": "UNSET"},
        })  # fmt: skip

    (tmp_path / "a.jsonl").write_text(
        span("send X", "1", None, "a") + "\n" + span("other", "9", None, "a")[:20]
    )
    (tmp_path / "b.jsonl").write_text(
        span("process X", "2", "1", "b", **{"messaging.message.id": "m1"}) + "\n"
    )
    assert spans.main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--message", "m1"]) == 0
    assert (
        capsys.readouterr().out == "trace abc (nodes a, b)\n  send X  CLIENT  a\n    process X  CLIENT  b\n\n"
    )
    assert spans.main([str(tmp_path / "a.jsonl"), "--trace", "0xdef"]) == 0
    assert capsys.readouterr().out == ""
