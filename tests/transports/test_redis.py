from __future__ import annotations

import asyncio
import importlib
import json
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from fastapi_catga.core.envelope import Envelope
from fastapi_catga.exceptions import ConfigurationError, NoResponderError, RequestTimeoutError, TransportError
from fastapi_catga.transports.base import Delivery, MemberEvent, MemberWatch, Transport
from fastapi_catga.transports.redis import RedisTransport
from fastapi_catga.transports.redis import transport as redis_transport
from tests.polling import eventually
from tests.servers import RedisServer, free_port
from tests.transports.contract import Connect, TransportContract, echo

pytestmark = pytest.mark.redis

Make = Callable[..., Awaitable[RedisTransport]]


class TestRedisTransport(TransportContract):
    @pytest.fixture
    async def connect(self, redis_server: RedisServer, cluster: str) -> AsyncIterator[Connect]:
        made: list[RedisTransport] = []

        async def connect() -> Transport:
            transport = RedisTransport(redis_server.url, cluster=cluster, max_payload=64 * 1024)
            await transport.connect()
            made.append(transport)
            return transport

        yield connect
        for transport in made:
            await transport.aclose()


@pytest.fixture
async def make(redis_server: RedisServer, cluster: str) -> AsyncIterator[Make]:
    """Connected transports on the test's server, closed afterwards; keywords go to the constructor."""
    made: list[RedisTransport] = []

    async def make(**options: Any) -> RedisTransport:
        transport = RedisTransport(redis_server.url, cluster=cluster, **options)
        await transport.connect()
        made.append(transport)
        return transport

    yield make
    for transport in made:
        await transport.aclose()


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A plain redis-py client on the test's server, to look behind the transport's back."""
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def works(client: RedisTransport, subject: str) -> bool:
    reply = await client.request(subject, Envelope({"catga-id": "1"}, b"{}"), timeout=1)
    return reply.headers["catga-id"] == "1"


async def test_connect_to_a_dead_port_fails_within_the_timeout() -> None:
    port = free_port()
    transport = RedisTransport(f"redis://:secret@127.0.0.1:{port}/0", connect_timeout=1)
    started = time.monotonic()
    with pytest.raises(TransportError) as caught:
        await transport.connect()
    assert time.monotonic() - started < 1.5
    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "secret" not in str(caught.value)
    await transport.aclose()


async def test_a_node_id_that_list_no_longer_shows_can_be_claimed_at_once(make: Make) -> None:
    """The index's expiry can be a millisecond ahead of the record key's (a script sees keys expire
    by the clock as its run started): `list` goes by the key, as the claim does. Checked as soon as
    `list` drops the record, which old code refused every time."""
    transport = await make()
    await transport.members.prepare(1)
    for n in range(10):
        assert await transport.members.create(f"node-{n}", b"old", 0.05)
        while f"node-{n}" in await transport.members.list():
            pass
        assert await transport.members.create(f"node-{n}", b"new", 0.05), f"node-{n} refused"


async def test_publish_to_nobody_is_no_responder_at_once(make: Make) -> None:
    server, client = await make(), await make()
    await server.subscribe("node.s", echo("s"))
    assert await works(client, "node.s")
    started = time.perf_counter()
    with pytest.raises(NoResponderError):
        await client.request("node.nobody", Envelope({}, b"{}"), timeout=5)
    assert time.perf_counter() - started < 0.1


async def test_publish_counts_receivers_per_message_in_one_batch(make: Make) -> None:
    a, b, publisher = await make(), await make(), await make()
    for transport in (a, b):
        await transport.subscribe("event.Both", lambda delivery: None)
    await a.subscribe("event.One", lambda delivery: None)
    subjects = ["event.Both", "event.One", "event.None"] * 50
    counts = await asyncio.gather(*(publisher.publish(s, Envelope({}, b"x")) for s in subjects))
    assert counts == [2, 1, 0] * 50


async def test_many_requests_in_flight_all_get_their_own_reply(make: Make) -> None:
    server, client = await make(), await make()
    await server.subscribe("node.s", echo("s"))
    replies = await asyncio.gather(
        *(client.request("node.s", Envelope({"n": str(n)}, str(n).encode()), timeout=5) for n in range(500))
    )
    assert [(r.headers["n"], r.body) for r in replies] == [(str(n), str(n).encode()) for n in range(500)]


async def test_a_payload_near_the_default_limit_round_trips(make: Make) -> None:
    server, client = await make(), await make()
    await server.subscribe("node.s", echo("s"))
    body = b"x" * (client.max_payload - 200)  # the frame adds the headers, reply channel and id
    reply = await client.request("node.s", Envelope({"catga-id": "big"}, body), timeout=5)
    assert reply.body == body


async def test_server_killed_and_restarted(redis_server: RedisServer, make: Make) -> None:
    server, client = await make(), await make()
    seen: dict[str, list[bool]] = {"server": [], "client": []}
    server.add_connection_listener(seen["server"].append)
    client.add_connection_listener(seen["client"].append)
    await server.subscribe("node.s", echo("s"))
    held: list[Delivery] = []
    mute = await server.subscribe("node.mute", held.append)
    assert await works(client, "node.s")
    watch = await client.members.watch()
    watched = asyncio.create_task(anext(aiter(watch), None))
    in_flight = asyncio.create_task(client.request("node.mute", Envelope({}, b"{}"), timeout=30))
    await eventually(lambda: len(held) == 1, within=2)  # the request is in flight when the server dies

    redis_server.kill()
    await eventually(lambda: seen == {"server": [False], "client": [False]}, within=2)
    with pytest.raises(TransportError):
        await in_flight  # failed with the connection, not at its 30 s timeout
    assert await asyncio.wait_for(watched, 1) is None  # the watch ended
    started = time.monotonic()
    with pytest.raises(TransportError):
        await client.request("node.s", Envelope({}, b"{}"), timeout=5)
    with pytest.raises(TransportError):
        await client.members.put("node-a", b"{}", 10)
    with pytest.raises(TransportError):
        await server.subscribe("node.late", echo("late"))
    await mute.unsubscribe()  # stops deliveries here without a server to tell
    assert time.monotonic() - started < 0.1

    redis_server.start()
    restarted = time.monotonic()
    await eventually(lambda: seen == {"server": [False, True], "client": [False, True]}, within=2)
    await eventually(lambda: works(client, "node.s"), within=2, ignore=(TransportError,))
    await client.members.put("node-a", b"{}", 10)
    assert await server.members.list() == {"node-a": b"{}"}
    assert time.monotonic() - restarted < 2
    with pytest.raises(NoResponderError):  # resubscribed what was subscribed, nothing else
        await client.request("node.mute", Envelope({}, b"{}"), timeout=1)


@pytest.mark.parametrize("unsent", [10_000, -1], ids=["queued", "waited"])
async def test_replies_are_queued_and_past_the_bound_each_waits_for_its_publish(
    make: Make, monkeypatch: pytest.MonkeyPatch, unsent: int
) -> None:
    """A reply's PUBLISH is queued and the run goes on; with too many queued, a reply waits for
    its own count (so a stalled server holds handler slots, not memory). Both answer."""
    monkeypatch.setattr(redis_transport, "_MAX_UNSENT", unsent)
    server, client = await make(), await make()
    await server.subscribe("node.q", echo("q"))
    replies = await asyncio.gather(
        *(client.request("node.q", Envelope({"n": str(n)}, b"{}"), timeout=5) for n in range(50))
    )
    assert sorted(int(reply.headers["n"]) for reply in replies) == list(range(50))


async def test_a_reply_is_queued_and_the_handlers_run_does_not_wait_for_redis(make: Make) -> None:
    """A reply's PUBLISH is queued and the reply returns in its first step: a handler's run that
    sends it does not suspend (on 3.11 it then needs no task of its own)."""
    transport = await make()
    reply = transport._reply("catga:{x}:gone", None, Envelope({}, b"1"))
    with pytest.raises(StopIteration):
        reply.send(None)


async def test_a_reply_whose_publish_failed_is_a_warning(
    make: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """Nobody awaits a reply's PUBLISH: a failed batch is logged (at most once per interval)."""
    transport = await make()
    failed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    failed.set_exception(TransportError("PUBLISH to Redis failed: the writer's socket was reset"))
    with caplog.at_level(logging.WARNING):
        transport._sent_reply("catga:{x}:caller", failed)
        transport._sent_reply("catga:{x}:caller", failed)  # held back: the same kind, within the interval
    assert caplog.text.count("could not answer a request on catga:{x}:caller") == 1
    assert "socket was reset" in caplog.text


async def test_a_request_nobody_hears_fails_at_once_with_no_responder(make: Make) -> None:
    client = await make()
    started = time.monotonic()
    with pytest.raises(NoResponderError, match="PUBLISH reached 0"):
        await client.request("node.nobody", Envelope({}, b"{}"), timeout=5)
    assert time.monotonic() - started < 2  # the count of 0 ends it, not the 5 s timeout


async def test_frozen_server_is_noticed_by_ping(redis_server: RedisServer, make: Make) -> None:
    transport = await make(health_check_interval=0.2)
    seen: list[bool] = []
    transport.add_connection_listener(seen.append)
    redis_server.pause()
    try:
        await eventually(lambda: seen == [False], within=2)
    finally:
        redis_server.resume()
    await eventually(lambda: seen == [False, True], within=2)


async def test_member_expires_without_keyspace_events(make: Make, raw: aioredis.Redis, cluster: str) -> None:
    await raw.config_set("notify-keyspace-events", "")
    transport = await make()
    await transport.members.put("node-x", b"{}", 0.3)
    assert await transport.members.list() == {"node-x": b"{}"}

    async def gone() -> bool:
        return await transport.members.list() == {}

    assert await eventually(gone, within=2) > 0.2
    assert await raw.zcard(f"catga:{{{cluster}}}:members") == 0  # the index was pruned too


async def test_member_record_is_readable_json(make: Make, raw: aioredis.Redis, cluster: str) -> None:
    transport = await make()
    record = {"node_id": "node-j", "endpoint": "http://10.0.0.1:8000"}
    await transport.members.put("node-j", json.dumps(record).encode(), 10)
    assert json.loads(await raw.get(f"catga:{{{cluster}}}:node:node-j") or b"") == record
    assert 9000 < await raw.pttl(f"catga:{{{cluster}}}:node:node-j") <= 10000
    assert await raw.zscore(f"catga:{{{cluster}}}:members", "node-j") is not None
    await transport.members.delete("node-j")
    assert await raw.exists(f"catga:{{{cluster}}}:node:node-j") == 0


async def test_garbage_on_any_channel_is_dropped(make: Make, raw: aioredis.Redis, cluster: str) -> None:
    server, client = await make(), await make()
    got: list[Delivery] = []
    await server.subscribe("node.g", got.append)
    await server.subscribe("node.s", echo("s"))
    watch = await server.members.watch()
    events: list[MemberEvent] = []
    collecting = asyncio.create_task(collect(watch, events))
    inboxes = await raw.pubsub_channels(f"catga:{{{cluster}}}:reply.*")  # each transport's reply channel
    assert len(inboxes) == 2
    garbage = [b"\xff\x00\xfe", b"no newline", b"[1]\nbody", b"5\n", b'"text"\nbody']
    for channel in [f"catga:{{{cluster}}}:node.g", f"catga:{{{cluster}}}:members:events", *inboxes]:
        for data in garbage:
            await raw.publish(channel, data)
    await raw.publish(f"catga:{{{cluster}}}:members:events", b'{"headers": {"kind": "boom"}}\n')

    assert await works(client, "node.s")
    await client.members.put("node-after", b"{}", 10)
    await eventually(lambda: MemberEvent("put", "node-after", b"{}") in events, within=2)
    assert got == []
    assert server.connected and client.connected
    await watch.stop()
    await collecting


async def collect(watch: MemberWatch, events: list[MemberEvent]) -> None:
    async for event in watch:
        events.append(event)


async def test_request_timeout_removes_the_pending_entry(make: Make) -> None:
    server, client = await make(), await make()
    await server.subscribe("node.mute", lambda delivery: None)
    with pytest.raises(RequestTimeoutError):
        await client.request("node.mute", Envelope({}, b"{}"), timeout=0.1)
    assert len(client._pending) == 0


async def test_close_fails_what_is_in_flight_and_is_idempotent(make: Make) -> None:
    server, client = await make(), await make()
    held: list[Delivery] = []
    await server.subscribe("node.mute", held.append)
    in_flight = asyncio.create_task(client.request("node.mute", Envelope({}, b"{}"), timeout=30))
    await eventually(lambda: len(held) == 1, within=2)
    await client.aclose()
    await client.aclose()
    with pytest.raises(TransportError):
        await asyncio.wait_for(in_flight, 1)
    assert not client.connected
    with pytest.raises(TransportError):
        await client.publish("event.X", Envelope({}, b"{}"))
    with pytest.raises(TransportError):
        await client.connect()


def test_bad_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        RedisTransport("http://localhost:6379")


def test_missing_redis_py_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in sys.modules if name == "redis" or name.startswith("redis.")]:
        monkeypatch.setitem(sys.modules, name, None)
    for name in [name for name in sys.modules if name.startswith("fastapi_catga.transports.redis")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r'pip install "fastapi-catga\[redis\]"'):
        importlib.import_module("fastapi_catga.transports.redis")


async def test_one_cluster_name_on_two_databases_is_two_clusters(
    redis_server: RedisServer, cluster: str
) -> None:
    """Keys live in a database; pub/sub channels do not. On database 1 a cluster names its channels
    apart: a request or event for node b of database 0 never reaches node b of database 1."""
    url = redis_server.url.rsplit("/", 1)[0]
    received: dict[str, list[bytes]] = {"0": [], "1": []}

    def on(db: str) -> Callable[[Delivery], None]:
        def record(delivery: Delivery) -> None:
            received[db].append(delivery.envelope.body)
            if delivery.reply is not None:
                asyncio.ensure_future(delivery.reply(Envelope({}, f"db{db}".encode())))

        return record

    transports = {db: RedisTransport(f"{url}/{db}", cluster=cluster) for db in ("0", "1")}
    try:
        for db, transport in transports.items():
            await transport.connect()
            await transport.subscribe("node.b", on(db))
            await transport.members.prepare(10)
        watch = await transports["1"].members.watch()
        reply = await transports["0"].request("node.b", Envelope({}, b"ping"), timeout=2)
        assert reply.body == b"db0"
        await transports["0"].members.put("b", b'{"node_id":"b"}', 10)
        await transports["0"].publish("node.b", Envelope({}, b"event"))
        await eventually(lambda: received["0"] == [b"ping", b"event"], within=2)
        # A marker published on database 1 after those: the server delivers in order, so what
        # would have crossed reaches database 1's node before it.
        await transports["1"].publish("node.b", Envelope({}, b"marker"))
        await eventually(lambda: b"marker" in received["1"], within=2)
        assert received["1"] == [b"marker"]
        assert await transports["1"].members.list() == {}
        await transports["1"].members.put("c", b'{"node_id":"c"}', 10)
        event = await asyncio.wait_for(anext(aiter(watch)), 2)
        assert (event.kind, event.node_id) == ("put", "c"), "database 0's put reached database 1's watch"
        await watch.stop()
    finally:
        for transport in transports.values():
            await transport.aclose()
