"""Durable messages traced: the sender's trace context is stored with the message, and the run on
another node (maybe a retry, much later) is a ``process`` span in the sender's trace.

On the in-memory broker (virtual clock) and over real nats-server and redis-server processes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any, ClassVar

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from fastapi_catga import Catga, CatgaSettings, Command, Durable, Event, Message, build
from fastapi_catga.core.observe import Observer
from fastapi_catga.otel import TracingObserver
from fastapi_catga.testing import InMemoryBroker, InMemoryTransport
from tests.polling import eventually
from tests.servers import NatsServer, RedisServer
from tests.virtual_time import EPOCH, run_virtual


class Pay(Command[str]):
    durable: ClassVar[Durable | bool] = Durable(attempts=3, backoff=(1.0,), lease=5.0)
    amount: int
    fail_first: bool = False


class Paid(Event):
    durable: ClassVar[Durable | bool] = True
    amount: int


failed_once: set[str] = set()


async def pay(command: Pay) -> str:
    if command.fail_first and command.message_id not in failed_once:
        failed_once.add(command.message_id)
        raise ValueError("the bank is down")
    return f"paid {command.amount}"


async def receipt(event: Paid) -> None:
    return None


async def ledger(event: Paid) -> None:
    return None


class Traced:
    """One node's tracer provider and in-memory exporter."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def spans(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.exporter.get_finished_spans() if span.name == name]


def child_of(span: ReadableSpan, parent: ReadableSpan) -> bool:
    return (
        span.parent is not None
        and span.parent.span_id == parent.context.span_id
        and span.context.trace_id == parent.context.trace_id
    )


async def two_nodes(settings: Mapping[str, Any], transport: Any = None) -> dict[str, tuple[Catga, Traced]]:
    """Caller ``a`` (no handler) and ``b``, which runs the durable handlers; each traced."""
    nodes: dict[str, tuple[Catga, Traced]] = {}
    for name in ("a", "b"):
        traced = Traced()
        catga = build(
            CatgaSettings(node_id=name, **settings),
            handlers=[] if name == "a" else [pay, receipt, ledger],
            observers=[TracingObserver(traced.provider)],
            **({} if transport is None else transport(name)),
        )
        await catga.start()
        nodes[name] = (catga, traced)
    return nodes


async def check_send_enqueue_publish(nodes: dict[str, tuple[Catga, Traced]]) -> None:
    (a, on_a), (_, on_b) = nodes["a"], nodes["b"]
    tracer = on_a.provider.get_tracer("test")

    with tracer.start_as_current_span("POST /pay") as http:
        assert await a.mediator.send(Pay(amount=5)) == "paid 5"
    (send,) = on_a.spans("send Pay")
    (process,) = on_b.spans("process Pay")
    assert send.kind == SpanKind.CLIENT and send.parent is not None
    assert send.parent.span_id == http.get_span_context().span_id
    assert child_of(process, send) and process.parent is not None and process.parent.is_remote
    assert process.kind == SpanKind.CONSUMER
    assert process.attributes is not None and process.attributes["catga.node.id"] == "b"

    with tracer.start_as_current_span("POST /pay-later"):
        accepted = await a.mediator.enqueue(Pay(amount=6))
        await a.mediator.publish(Paid(amount=6))
    (enqueue,) = on_a.spans("enqueue Pay")
    (publish,) = on_a.spans("publish Paid")
    assert (enqueue.kind, publish.kind) == (SpanKind.PRODUCER, SpanKind.PRODUCER)
    assert (
        enqueue.attributes is not None and enqueue.attributes["messaging.message.id"] == accepted.message_id
    )
    await eventually(lambda: len(on_b.spans("process Pay")) == 2, within=10, message="the enqueued Pay ran")
    assert child_of(on_b.spans("process Pay")[1], enqueue)
    # One run per handler group of the durable event, each in the publisher's trace.
    await eventually(lambda: len(on_b.spans("process Paid")) == 2, within=10, message="Paid ran twice")
    assert all(child_of(span, publish) for span in on_b.spans("process Paid"))


def test_a_durable_send_enqueue_and_publish_continue_the_trace_on_the_memory_broker() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        nodes = await two_nodes(
            {"heartbeat_interval": 1, "node_ttl": 3},
            lambda _: {
                "transport": InMemoryTransport(broker),
                "clock": loop.time,
                "wall_clock": lambda: EPOCH + loop.time(),
            },
        )
        try:
            await check_send_enqueue_publish(nodes)
        finally:
            for catga, _ in nodes.values():
                await catga.stop()

    run_virtual(scenario())


def test_a_retried_durable_run_is_a_second_process_span_of_the_same_send() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        nodes = await two_nodes(
            {"heartbeat_interval": 1, "node_ttl": 3, "request_timeout": 30},
            lambda _: {
                "transport": InMemoryTransport(broker),
                "clock": loop.time,
                "wall_clock": lambda: EPOCH + loop.time(),
            },
        )
        (a, on_a), (_, on_b) = nodes["a"], nodes["b"]
        try:
            assert await a.mediator.send(Pay(amount=7, fail_first=True)) == "paid 7"
        finally:
            for catga, _ in nodes.values():
                await catga.stop()
        (send,) = on_a.spans("send Pay")
        first, second = on_b.spans("process Pay")
        assert child_of(first, send) and child_of(second, send)
        assert first.status.status_code == StatusCode.ERROR
        assert [event.name for event in first.events] == ["exception"]
        assert second.status.status_code == StatusCode.UNSET

    run_virtual(scenario())


class Recording(Observer):
    """Not OpenTelemetry: what the hooks give an observer of one's own."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str]]] = []

    def inject(self, headers: dict[str, str]) -> None:
        headers["x-trace"] = "from-a"

    def handle_started(self, message: Message, headers: Mapping[str, str]) -> object:
        self.received.append((message.type_name, dict(headers)))
        return None


def test_any_observer_gets_the_headers_it_injected_back_on_the_durable_run() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        recording = Recording()
        nodes = []
        for name in ("a", "b"):
            nodes.append(
                build(
                    CatgaSettings(node_id=name, heartbeat_interval=1, node_ttl=3),
                    handlers=[pay] if name == "b" else [],
                    observers=[recording] if name == "b" else [],
                    transport=InMemoryTransport(broker),
                    clock=loop.time,
                    wall_clock=lambda: EPOCH + loop.time(),
                )
            )
            await nodes[-1].start()
        try:
            # a has no observer: nothing is injected, and b's observer sees plain headers.
            assert await nodes[0].mediator.send(Pay(amount=1)) == "paid 1"
            assert await nodes[1].mediator.send(Pay(amount=2)) == "paid 2"
        finally:
            for catga in nodes:
                await catga.stop()
        (from_a, a_headers), (from_b, b_headers) = recording.received
        assert (from_a, from_b) == ("Pay", "Pay")
        assert "x-trace" not in a_headers
        assert b_headers["x-trace"] == "from-a"

    run_virtual(scenario())


@pytest.fixture(
    params=[pytest.param("nats", marks=pytest.mark.nats), pytest.param("redis", marks=pytest.mark.redis)]
)
async def broker_nodes(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, tuple[Catga, Traced]]]:
    server: NatsServer | RedisServer = request.getfixturevalue(f"{request.param}_server")
    url = {"nats_url" if request.param == "nats" else "redis_url": server.url}
    nodes = await two_nodes({"transport": request.param, "cluster": "traced", **url})
    try:
        await eventually(lambda: all(len(c.node.view.nodes()) == 2 for c, _ in nodes.values()), within=5)
        yield nodes
    finally:
        for catga, _ in nodes.values():
            await catga.stop()


async def test_durable_messages_continue_the_trace_over_a_real_broker(
    broker_nodes: dict[str, tuple[Catga, Traced]],
) -> None:
    await check_send_enqueue_publish(broker_nodes)
