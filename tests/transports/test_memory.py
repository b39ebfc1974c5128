from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from fastapi_catga.core.envelope import Envelope
from fastapi_catga.exceptions import RequestTimeoutError, TransportError
from fastapi_catga.transports.base import Delivery, MemberEvent, Transport, unsubscribe_all
from fastapi_catga.transports.memory import InMemoryBroker, InMemoryTransport
from tests.polling import eventually
from tests.transports.contract import Connect, TransportContract
from tests.virtual_time import run_virtual


class TestInMemoryTransport(TransportContract):
    @pytest.fixture
    async def connect(self, cluster: str) -> AsyncIterator[Connect]:
        broker = InMemoryBroker()
        made: list[InMemoryTransport] = []

        async def connect() -> Transport:
            transport = InMemoryTransport(broker, cluster=cluster, max_payload=64 * 1024)
            await transport.connect()
            made.append(transport)
            return transport

        yield connect
        for transport in made:
            await transport.aclose()


def test_a_frozen_broker_holds_every_call_until_the_thaw() -> None:
    run_virtual(_frozen_broker())


async def _frozen_broker() -> None:
    loop = asyncio.get_running_loop()
    broker = InMemoryBroker(clock=loop.time)
    a, b = InMemoryTransport(broker), InMemoryTransport(broker)
    await a.connect()
    await b.connect()
    watch = await b.members.watch()
    heard: list[Delivery] = []
    await b.subscribe("news", heard.append)

    async def echo(delivery: Delivery) -> None:
        assert delivery.reply is not None
        await delivery.reply(Envelope({"echo": "1"}, delivery.envelope.body))

    tasks: set[asyncio.Task[None]] = set()
    await b.subscribe("echo", lambda delivery: tasks.add(loop.create_task(echo(delivery))))
    in_flight = loop.create_task(a.request("echo", Envelope(body=b"early"), timeout=300))
    await asyncio.sleep(0)  # delivered; the reply is under way when the broker freezes

    broker.freeze()
    put = loop.create_task(a.members.put("a", b"{}", 10))
    published = loop.create_task(a.publish("news", Envelope(body=b"held")))
    listed = loop.create_task(b.members.list())
    with pytest.raises(RequestTimeoutError):
        await a.request("echo", Envelope(body=b"late"), timeout=5)  # its timeout runs while frozen
    await asyncio.sleep(60)
    assert a.connected and b.connected  # a frozen broker is silent, not gone
    assert not any(task.done() for task in (in_flight, put, published, listed))
    assert heard == [] and len(watch) == 0

    broker.thaw()
    assert (await in_flight).body == b"early"
    await put
    assert await published == 1
    assert await listed == {"a": b"{}"}
    assert [d.envelope.body for d in heard] == [b"held"]
    assert await anext(aiter(watch)) == MemberEvent("put", "a", b"{}")
    await asyncio.gather(*tasks)


def test_an_outage_fails_the_calls_a_frozen_broker_held() -> None:
    run_virtual(_outage_while_frozen())


async def _outage_while_frozen() -> None:
    broker = InMemoryBroker(clock=asyncio.get_running_loop().time)
    transport = InMemoryTransport(broker)
    await transport.connect()
    broker.freeze()
    put = asyncio.create_task(transport.members.put("a", b"{}", 10))
    await asyncio.sleep(1)
    broker.outage()
    with pytest.raises(TransportError):
        await put
    assert not broker.frozen


class _Stubborn:
    """A subscription whose unsubscribe ignores its cancellation for a while, then fails."""

    async def unsubscribe(self) -> None:
        until = asyncio.get_running_loop().time() + 2.0
        while asyncio.get_running_loop().time() < until:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)
        raise RuntimeError("the client broke")


async def test_unsubscribing_waits_once_for_the_broker_and_leaves_a_stubborn_one_behind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = time.monotonic()
    await unsubscribe_all([_Stubborn()], within=0.5)
    assert time.monotonic() - started < 0.9, "waited more than its bound (twice it, before)"
    await eventually(lambda: "unsubscribe failed unexpectedly" in caplog.text, within=4)  # retrieved, logged
