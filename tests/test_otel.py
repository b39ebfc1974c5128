"""TracingBehavior opens a span per handler run and marks failures (OpenTelemetry SDK, in memory)."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from fastapi_catga import CatgaSettings, Command, RemoteHandlerError, build
from fastapi_catga.otel import TracingBehavior
from fastapi_catga.testing import InMemoryTransport


class Charge(Command[str]):
    amount: int


async def charge(command: Charge) -> str:
    if command.amount < 0:
        raise ValueError("negative amount")
    return "ok"


async def test_every_handler_run_gets_a_span_and_failures_are_marked() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    node = build(
        CatgaSettings(),
        handlers=[charge],
        behaviors=[TracingBehavior(provider)],
        transport=InMemoryTransport(),
    )
    await node.start()
    try:
        command = Charge(amount=5)
        assert await node.mediator.send(command) == "ok"
        with pytest.raises(RemoteHandlerError, match="Charge handler raised ValueError"):
            await node.mediator.send(Charge(amount=-1))
    finally:
        await node.stop()
    ok, failed = exporter.get_finished_spans()
    assert (ok.name, ok.kind) == ("catga Charge", SpanKind.CONSUMER)
    assert ok.attributes is not None and ok.attributes["messaging.message.id"] == command.message_id
    assert ok.status.status_code == StatusCode.UNSET
    assert failed.status.status_code == StatusCode.ERROR
    assert [event.name for event in failed.events] == ["exception"]
