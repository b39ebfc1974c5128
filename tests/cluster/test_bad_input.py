"""Bad input straight on the wire (raw nats-py, raw redis-py): typed errors fast, the node keeps serving."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

import nats
import pytest
import redis.asyncio as aioredis

from fastapi_catga import Catga, CatgaSettings, build
from fastapi_catga.core.envelope import DEADLINE, MESSAGE_TYPE, STATUS, Envelope, pack, unpack
from fastapi_catga.prometheus import PrometheusObserver
from tests.cluster import workload
from tests.cluster.workload import Work
from tests.polling import eventually
from tests.servers import NatsServer, RedisServer

pytestmark = pytest.mark.nats


@pytest.fixture
async def node(nats_server: NatsServer) -> AsyncIterator[Catga]:
    catga = build(
        CatgaSettings(transport="nats", nats_url=nats_server.url, cluster="bad", node_id="target"),
        handlers=[workload],
    )
    await catga.start()
    yield catga
    await catga.stop()


def frame(headers: dict[str, str], body: bytes) -> bytes:
    return pack(Envelope(headers, body))


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\xff\x00 not a frame", "invalid_message"),
        (b'{"catga-type": "Work"}', "invalid_message"),  # no newline, no body
        (frame({}, b"{}"), "invalid_message"),  # no type header
        (frame({MESSAGE_TYPE: "NoSuchType"}, b"{}"), "handler_not_found"),
        (frame({MESSAGE_TYPE: "Happened"}, b"{}"), "handler_not_found"),  # an event sent as a request
        (frame({MESSAGE_TYPE: "Work"}, b"{not json"), "invalid_message"),
        (frame({MESSAGE_TYPE: "Work"}, b'{"delay": "soon"}'), "invalid_message"),
        (frame({MESSAGE_TYPE: ["Work"]}, b"{}"), "invalid_message"),  # type: ignore[dict-item]
        (frame({MESSAGE_TYPE: "Work", DEADLINE: "9" * 400}, b"{}"), "invalid_message"),
        (frame({MESSAGE_TYPE: "Work"}, b"\xff\xfe not utf-8"), "invalid_message"),
    ],
)
async def test_bad_requests_get_a_typed_error_at_once(
    nats_server: NatsServer, node: Catga, data: bytes, code: str
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        started = time.perf_counter()
        reply = await nc.request("catga.bad.node.target", data, timeout=2)
        elapsed = time.perf_counter() - started
        envelope = unpack(reply.data)
        assert envelope.headers[STATUS] == "error"
        assert json.loads(envelope.body)["code"] == code
        assert elapsed < 0.1
    finally:
        await nc.close()
    assert await node.mediator.send_to_node(Work(), "target") == "?"  # still serving


async def test_a_flood_of_bad_requests_is_counted_and_logged_once_per_kind(
    nats_server: NatsServer, node: Catga, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fastapi_catga")
    nc = await nats.connect(nats_server.url)
    try:
        bad = [frame({MESSAGE_TYPE: "Work"}, b"\xff"), frame({MESSAGE_TYPE: "Nope"}, b"{}")] * 100
        replies = await asyncio.gather(
            *(nc.request("catga.bad.node.target", data, timeout=5) for data in bad)
        )
    finally:
        await nc.close()
    assert all(unpack(reply.data).headers[STATUS] == "error" for reply in replies)
    assert node.node.responder.stats["bad_requests"] == 200
    lines = [r for r in caplog.records if r.name.startswith("fastapi_catga") and "refused" in r.getMessage()]
    assert len(lines) == 2, [r.getMessage() for r in lines]  # one per kind in the interval
    assert not any(r.exc_info for r in caplog.records), "no traceback for bad input"


async def test_expired_requests_of_made_up_types_add_no_metric_series(nats_server: NatsServer) -> None:
    """A peer's type names are no label values: 50 expired requests of 50 made-up types are one
    series, as unknown types are on every other path."""
    observer = PrometheusObserver()
    catga = build(
        CatgaSettings(transport="nats", nats_url=nats_server.url, cluster="bad", node_id="target"),
        handlers=[workload],
        observers=[observer],
    )
    await catga.start()
    nc = await nats.connect(nats_server.url)
    try:
        for n in range(50):
            await nc.publish(
                "catga.bad.node.target", frame({MESSAGE_TYPE: f"Made{n}", DEADLINE: "1000"}, b"{}")
            )
        await nc.flush()
        await eventually(lambda: catga.node.responder.stats["expired_dropped"] == 50, within=5)
    finally:
        await nc.close()
        await catga.stop()
    series = [s for m in observer.registry.collect() if m.name == "catga_stale_dropped" for s in m.samples]
    assert {sample.labels["type"] for sample in series if sample.name.endswith("_total")} == {"?"}


async def test_bad_events_are_dropped_and_the_node_keeps_serving(
    nats_server: NatsServer, node: Catga
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        for data in (
            b"garbage",
            frame({MESSAGE_TYPE: "Happened"}, b"[]"),
            frame({MESSAGE_TYPE: "Work"}, b"{}"),
        ):
            await nc.publish("catga.bad.event.Happened", data)
        await nc.flush()
    finally:
        await nc.close()
    await eventually(lambda: node.node.responder.stats["bad_events"] == 2, within=2)
    assert await node.mediator.send_to_node(Work(), "target") == "?"


@pytest.mark.redis
async def test_bad_requests_over_redis_get_a_typed_error(redis_server: RedisServer) -> None:
    catga = build(
        CatgaSettings(transport="redis", redis_url=redis_server.url, cluster="bad", node_id="target"),
        handlers=[workload],
    )
    await catga.start()
    client = aioredis.Redis.from_url(redis_server.url)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe("reply-here")
        await pubsub.get_message(timeout=1)  # the subscribe confirmation
        request = {MESSAGE_TYPE: "Work", "catga-reply-to": "reply-here", "catga-corr": "1"}
        assert await client.publish("catga:{bad}:node.target", frame(request, b'{"delay": "soon"}')) == 1
        message = await pubsub.get_message(timeout=2)
        assert message is not None
        envelope = unpack(message["data"])
        assert json.loads(envelope.body)["code"] == "invalid_message"
        assert (
            await client.publish("catga:{bad}:node.target", b"\xff garbage") == 1
        )  # no reply channel: dropped
        assert await catga.mediator.send_to_node(Work(), "target") == "?"
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await client.aclose()
        await catga.stop()
