"""Traces, metrics and the live cluster page for the example app, on with ``ORDERS_OBSERVE=1``.

Walkthrough: docs/observability.md. With the switch off (the default) this module imports nothing
more and installs nothing: the app runs as fast as without it. With it on:

- `TracingObserver` on an OpenTelemetry SDK tracer provider (``service.name`` ``orders``,
  ``service.instance.id`` ``CATGA_NODE_ID``; ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES``
  add to them), and FastAPI's own
  OpenTelemetry instrumentation, so a trace starts at the HTTP request and follows its messages
  to the nodes that run them. Spans go, in batches (``OTEL_BSP_SCHEDULE_DELAY``, 5000 ms by
  default), to ``ORDERS_SPANS_FILE`` as one JSON object per line (``-`` or unset: standard
  output), or to an OTLP/HTTP collector when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set.
- `PrometheusObserver`: ``GET /catga/metrics``.
- `DashboardObserver` and ``catga_dashboard_router``: ``GET /catga/dashboard``. It shows every
  member's endpoint and metadata: a real app mounts it behind its own auth.
"""

from __future__ import annotations

import os
import sys
from typing import IO, TYPE_CHECKING

from fastapi import FastAPI

from fastapi_catga.core.observe import Observer

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ["SWITCH", "enabled", "exporter", "instrument", "observers", "tracer_provider"]

#: The variable that turns it all on (``1``).
SWITCH = "ORDERS_OBSERVE"
#: Requests the HTTP instrumentation leaves out: polled all the time, or streaming for minutes.
UNTRACED = "catga/health,catga/metrics,catga/dashboard"

_provider: TracerProvider | None = None


def enabled() -> bool:
    """Whether ``ORDERS_OBSERVE=1``."""
    return os.environ.get(SWITCH, "") == "1"


def observers() -> list[Observer]:
    """Tracing, metrics and dashboard observers for `catga_lifespan`; none while switched off."""
    if not enabled():
        return []
    from fastapi_catga import DashboardObserver
    from fastapi_catga.otel import TracingObserver
    from fastapi_catga.prometheus import PrometheusObserver

    return [TracingObserver(tracer_provider()), PrometheusObserver(), DashboardObserver()]


def instrument(app: FastAPI) -> None:
    """Trace each HTTP request and serve the dashboard; nothing while switched off."""
    if not enabled():
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    from fastapi_catga import catga_dashboard_router

    FastAPIInstrumentor.instrument_app(
        app, tracer_provider=tracer_provider(), excluded_urls=UNTRACED, exclude_spans=["receive", "send"]
    )
    app.include_router(catga_dashboard_router)


def tracer_provider() -> TracerProvider:
    """This process's SDK provider (made once, also installed as the global one), with its exporter."""
    global _provider
    if _provider is None:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        attributes = {"service.name": "orders"}
        if node_id := os.environ.get("CATGA_NODE_ID"):
            attributes["service.instance.id"] = node_id  # names the node on its HTTP spans too
        _provider = TracerProvider(resource=Resource.create(attributes))
        _provider.add_span_processor(BatchSpanProcessor(exporter()))
        trace.set_tracer_provider(_provider)
    return _provider


def exporter() -> SpanExporter:
    """OTLP/HTTP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set, else JSON lines to ``ORDERS_SPANS_FILE``."""
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as exc:
            raise ImportError(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set: pip install opentelemetry-exporter-otlp-proto-http"
            ) from exc
        return OTLPSpanExporter()  # reads the OTEL_EXPORTER_OTLP_* variables itself
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    path = os.environ.get("ORDERS_SPANS_FILE", "-")
    out: IO[str] = sys.stdout if path == "-" else open(path, "a", encoding="utf-8")  # noqa: SIM115
    return ConsoleSpanExporter(out=out, formatter=_json_line)


def _json_line(span: ReadableSpan) -> str:
    line: str = span.to_json(indent=None)
    return line + "\n"
