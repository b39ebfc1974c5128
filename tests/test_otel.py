"""TracingBehavior opens a span per handler run; TracingObserver runs one trace across nodes over a real
nats-server (OpenTelemetry SDK, each node with its own in-memory exporter)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from fastapi_catga import Catga, CatgaSettings, Command, Event, RemoteHandlerError, build
from fastapi_catga.otel import TracingBehavior, TracingObserver
from fastapi_catga.prometheus import PrometheusObserver
from fastapi_catga.testing import InMemoryTransport
from tests.polling import eventually
from tests.servers import NatsServer


class Charge(Command[str]):
    amount: int


async def charge(command: Charge) -> str:
    if command.amount == -5:  # 5 MB of error text, with what should stay in the node's log
        raise ValueError("card=4111 " + "E" * 5_000_000)
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


# -- TracingObserver: one trace across nodes over a real nats-server ------------------------------


class Traced:
    """One node's own tracer provider and in-memory exporter."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def spans(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.exporter.get_finished_spans() if span.name == name]


@pytest.fixture
async def traced_cluster(nats_server: NatsServer) -> AsyncIterator[dict[str, tuple[Catga, Traced]]]:
    """Caller ``a`` (no handler) and handlers ``b`` and ``c``, each with its own tracer provider."""
    nodes: dict[str, tuple[Catga, Traced]] = {}
    for name in ("a", "b", "c"):
        traced = Traced()
        settings = CatgaSettings(transport="nats", nats_url=nats_server.url, cluster="otel", node_id=name)
        nodes[name] = (
            build(
                settings,
                handlers=[] if name == "a" else [charge, announce],
                observers=[TracingObserver(traced.provider)],
            ),
            traced,
        )
        await nodes[name][0].start()
    try:
        await eventually(lambda: all(len(c.node.view.nodes()) == 3 for c, _ in nodes.values()), within=5)
        yield nodes
    finally:
        for catga, _ in nodes.values():
            await catga.stop()


class Announced(Event):
    text: str


async def announce(event: Announced) -> None:
    return None


def handler_spans(nodes: dict[str, tuple[Catga, Traced]], name: str) -> list[ReadableSpan]:
    return [span for _, traced in nodes.values() for span in traced.spans(name)]


async def test_one_trace_runs_from_the_callers_span_to_the_handler_on_another_node(
    traced_cluster: dict[str, tuple[Catga, Traced]],
) -> None:
    a, traced_a = traced_cluster["a"]
    tracer = traced_a.provider.get_tracer("test")
    command = Charge(amount=5)
    with tracer.start_as_current_span("GET /charge") as http:
        assert await a.mediator.send(command) == "ok"
    trace_id = http.get_span_context().trace_id
    (send,) = traced_a.spans("send Charge")
    (attempt,) = traced_a.spans("send Charge attempt 1")
    (process,) = handler_spans(traced_cluster, "process Charge")
    assert {span.context.trace_id for span in (send, attempt, process)} == {trace_id}
    assert send.parent is not None and send.parent.span_id == http.get_span_context().span_id
    assert attempt.parent is not None and attempt.parent.span_id == send.context.span_id
    assert process.parent is not None and process.parent.span_id == attempt.context.span_id
    assert process.parent.is_remote
    assert (send.kind, attempt.kind, process.kind) == (SpanKind.CLIENT, SpanKind.CLIENT, SpanKind.CONSUMER)
    assert send.attributes == {
        "messaging.system": "catga",
        "messaging.destination.name": "Charge",
        "messaging.message.id": command.message_id,
        "messaging.operation.type": "send",
        "catga.node.id": "a",
    }
    assert attempt.attributes is not None and attempt.attributes["catga.attempt"] == 1
    assert process.attributes is not None and process.attributes["messaging.operation.type"] == "process"
    assert process.attributes["catga.node.id"] == attempt.attributes["catga.target.node.id"]


async def test_a_failover_shows_two_attempts_the_first_one_failed(
    traced_cluster: dict[str, tuple[Catga, Traced]],
) -> None:
    a, traced_a = traced_cluster["a"]
    await traced_cluster["b"][0].node.responder.stop(drain_timeout=0)  # b still a member, not listening
    for _ in range(3):  # round robin: one of these picks b first
        traced_a.exporter.clear()
        assert await a.mediator.send(Charge(amount=1)) == "ok"
        if traced_a.spans("send Charge attempt 2"):
            break
    (send,) = traced_a.spans("send Charge")
    (first,) = traced_a.spans("send Charge attempt 1")
    (second,) = traced_a.spans("send Charge attempt 2")
    assert first.attributes is not None and first.attributes["catga.target.node.id"] == "b"
    assert first.status.status_code == StatusCode.ERROR
    assert [event.name for event in first.events] == ["exception"]
    assert second.status.status_code == StatusCode.UNSET
    assert send.status.status_code == StatusCode.UNSET
    assert first.parent is not None and second.parent is not None
    assert first.parent.span_id == second.parent.span_id == send.context.span_id
    processes = traced_cluster["c"][1].spans("process Charge")
    assert processes[-1].parent is not None and processes[-1].parent.span_id == second.context.span_id


async def test_publish_and_broadcast_are_traced_to_every_node(
    traced_cluster: dict[str, tuple[Catga, Traced]],
) -> None:
    a, traced_a = traced_cluster["a"]
    await a.mediator.publish(Announced(text="hi"))
    (publish,) = traced_a.spans("publish Announced")
    assert publish.kind == SpanKind.PRODUCER
    await eventually(lambda: len(handler_spans(traced_cluster, "process Announced")) == 2, within=5)
    for span in handler_spans(traced_cluster, "process Announced"):
        assert span.parent is not None and span.parent.span_id == publish.context.span_id
    await a.mediator.broadcast(Charge(amount=2))
    (broadcast,) = traced_a.spans("broadcast Charge")
    attempts = [s for s in traced_a.exporter.get_finished_spans() if s.name.startswith("send Charge attempt")]
    assert len(attempts) == 2  # b and c; a has no handler, known without an attempt
    assert all(s.parent is not None and s.parent.span_id == broadcast.context.span_id for s in attempts)
    assert {s.context.trace_id for s in handler_spans(traced_cluster, "process Charge")} == {
        broadcast.context.trace_id
    }


def traced_alone(traced: Traced) -> Catga:
    """A node alone (its sends run in-process), traced by both the behavior and the observer."""
    return build(
        CatgaSettings(),
        handlers=[charge],
        behaviors=[TracingBehavior(traced.provider)],
        observers=[TracingObserver(traced.provider)],
        transport=InMemoryTransport(),
    )


async def test_a_local_send_is_traced_and_tracing_behavior_still_nests() -> None:
    traced = Traced()
    node = traced_alone(traced)
    await node.start()
    try:
        assert await node.mediator.send(Charge(amount=1)) == "ok"
    finally:
        await node.stop()
    (send,) = traced.spans("send Charge")
    (attempt,) = traced.spans("send Charge attempt 1")
    (process,) = traced.spans("process Charge")
    (handler,) = traced.spans("catga Charge")
    assert attempt.parent is not None and attempt.parent.span_id == send.context.span_id
    assert process.parent is not None and process.parent.span_id == attempt.context.span_id
    assert handler.parent is not None and handler.parent.span_id == process.context.span_id


async def test_a_handlers_huge_error_makes_bounded_spans_without_its_text(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each span of an in-process send that failed holds a bounded exception event: a 5 MB one is
    over what a collector takes in a batch. The caller's spans have the error the caller gets, not
    the handler's own text, as on a caller on another node; the handler's span and the node's log
    line have it, cut."""
    traced = Traced()
    node = traced_alone(traced)
    await node.start()
    try:
        with pytest.raises(RemoteHandlerError):
            await node.mediator.send(Charge(amount=-5))
    finally:
        await node.stop()
    for name in ("send Charge", "send Charge attempt 1", "process Charge", "catga Charge"):
        (span,) = traced.spans(name)
        (event,) = [event for event in span.events if event.name == "exception"]
        assert event.attributes is not None
        size = sum(len(str(value)) for value in event.attributes.values())
        assert size < 40_000, (name, size)
        if name != "catga Charge":  # the handler's own span: its error, cut
            assert "card=4111" not in str(dict(event.attributes)), name
    assert max(len(record.getMessage()) + len(record.exc_text or "") for record in caplog.records) < 40_000
    assert "card=4111" in caplog.text, "the node's log keeps the start of the text"


async def test_the_publishers_own_event_handlers_are_a_process_span_and_a_counted_run() -> None:
    traced, metrics = Traced(), PrometheusObserver()

    async def fails(event: Announced) -> None:
        raise ValueError("no")

    node = build(
        CatgaSettings(),
        handlers=[announce, fails],
        observers=[TracingObserver(traced.provider), metrics],
        transport=InMemoryTransport(),
    )
    await node.start()
    try:
        await node.mediator.publish(Announced(text="hi"))
    finally:
        await node.stop()
    (publish,) = traced.spans("publish Announced")
    (process,) = traced.spans("process Announced")
    assert process.parent is not None and process.parent.span_id == publish.context.span_id
    assert process.status.status_code == StatusCode.ERROR  # one of its two handlers failed
    labels = {"type": "Announced", "kind": "event", "outcome": "handler_error"}
    assert metrics.registry.get_sample_value("catga_messages_handled_total", labels) == 1
