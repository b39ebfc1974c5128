"""One contract, every transport: subclass `TransportContract` and provide the ``connect`` fixture."""

from __future__ import annotations

import asyncio
import contextvars
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from fastapi_catga.core.envelope import Envelope
from fastapi_catga.exceptions import (
    ConfigurationError,
    MessageTooLargeError,
    NoResponderError,
    RequestTimeoutError,
)
from fastapi_catga.transports.base import Delivery, MemberEvent, Transport
from tests.polling import eventually

#: Makes a connected transport; every transport one test makes shares one broker and cluster name.
Connect = Callable[[], Awaitable[Transport]]

#: Set by a test's sender: a handler on another node must never see it.
SENDERS_OWN: contextvars.ContextVar[str] = contextvars.ContextVar("senders_own", default="unset")


def echo(transport_name: str) -> Callable[[Delivery], None]:
    def callback(delivery: Delivery) -> None:
        assert delivery.reply is not None
        reply = Envelope({"answered-by": transport_name, **delivery.envelope.headers}, delivery.envelope.body)
        asyncio.ensure_future(delivery.reply(reply))

    return callback


class TransportContract:
    @pytest.fixture
    async def connect(self) -> AsyncIterator[Connect]:
        raise NotImplementedError
        yield  # pragma: no cover

    @pytest.fixture
    def cluster(self) -> str:
        return f"t{uuid.uuid4().hex[:10]}"

    async def test_request_reply_keeps_headers_and_body(self, connect: Connect) -> None:
        server, client = await connect(), await connect()
        await server.subscribe("node.a", echo("a"))
        reply = await client.request("node.a", Envelope({"catga-id": "42"}, b'{"x":1}'), timeout=2)
        assert reply.body == b'{"x":1}'
        assert reply.headers["catga-id"] == "42"
        assert reply.headers["answered-by"] == "a"

    async def test_request_to_nobody_fails_fast_with_no_responder(self, connect: Connect) -> None:
        client = await connect()
        started = time.perf_counter()
        with pytest.raises(NoResponderError):
            await client.request("node.nobody", Envelope({}, b"{}"), timeout=5)
        assert time.perf_counter() - started < 0.5

    async def test_request_without_reply_times_out(self, connect: Connect) -> None:
        server, client = await connect(), await connect()
        await server.subscribe("node.mute", lambda delivery: None)
        started = time.perf_counter()
        with pytest.raises(RequestTimeoutError):
            await client.request("node.mute", Envelope({}, b"{}"), timeout=0.3)
        assert 0.25 < time.perf_counter() - started < 2.0

    async def test_a_reply_sent_right_before_close_reaches_its_requester(self, connect: Connect) -> None:
        """A stopping node answers its last runs ("stopped while running"), then closes: those
        answers go out, or its callers wait out their deadlines (30 s here)."""
        server, client = await connect(), await connect()
        held: list[Delivery] = []
        await server.subscribe("node.last", held.append)
        asking = asyncio.create_task(client.request("node.last", Envelope({"n": "1"}, b"{}"), timeout=30))
        await eventually(lambda: len(held) == 1, within=2)
        assert held[0].reply is not None
        await held[0].reply(Envelope({"answer": "last"}, b"{}"))
        await server.aclose()
        reply = await asyncio.wait_for(asking, 5)
        assert reply.headers["answer"] == "last"

    async def test_a_delivery_never_runs_in_the_senders_context(self, connect: Connect) -> None:
        """A caller's context variables (its user, its tenant) do not reach a handler on another
        node over NATS or Redis: not in memory either, or code that leans on them passes its tests."""
        server, client = await connect(), await connect()
        seen: list[str] = []
        replies: set[asyncio.Future[None]] = set()  # held until done

        def callback(delivery: Delivery) -> None:
            seen.append(SENDERS_OWN.get())
            if delivery.reply is not None:
                reply = asyncio.ensure_future(delivery.reply(Envelope({}, b"{}")))
                replies.add(reply)
                reply.add_done_callback(replies.discard)

        await server.subscribe("node.ctx", callback)
        SENDERS_OWN.set("the caller's")
        await client.request("node.ctx", Envelope({}, b"{}"), timeout=2)
        await client.publish("node.ctx", Envelope({}, b"{}"))
        await eventually(lambda: len(seen) == 2, within=2)
        assert seen == ["unset", "unset"]

    async def test_queue_group_gives_each_request_to_one_member(self, connect: Connect) -> None:
        a, b, client = await connect(), await connect(), await connect()
        if not a.supports_queue_groups:
            with pytest.raises(ConfigurationError):
                await a.subscribe("type.Work", echo("a"), queue="workers")
            return
        seen: list[str] = []

        def member(name: str) -> Callable[[Delivery], None]:
            reply = echo(name)

            def callback(delivery: Delivery) -> None:
                seen.append(name)
                reply(delivery)

            return callback

        await a.subscribe("type.Work", member("a"), queue="workers")
        await b.subscribe("type.Work", member("b"), queue="workers")
        for _ in range(40):
            await client.request("type.Work", Envelope({}, b"{}"), timeout=2)
        assert len(seen) == 40
        assert {"a", "b"} <= set(seen)

    async def test_publish_reaches_every_subscriber(self, connect: Connect) -> None:
        a, b, publisher = await connect(), await connect(), await connect()
        got: list[tuple[str, bytes]] = []
        await a.subscribe("event.Happened", lambda d: got.append(("a", d.envelope.body)))
        await b.subscribe("event.Happened", lambda d: got.append(("b", d.envelope.body)))
        receivers = await publisher.publish("event.Happened", Envelope({"catga-type": "Happened"}, b"1"))
        assert receivers in (None, 2)
        await eventually(lambda: len(got) == 2, within=2)
        assert sorted(got) == [("a", b"1"), ("b", b"1")]

    async def test_unsubscribe_stops_deliveries(self, connect: Connect) -> None:
        server, client = await connect(), await connect()
        subscription = await server.subscribe("node.gone", echo("gone"))
        await client.request("node.gone", Envelope({}, b"{}"), timeout=2)
        await subscription.unsubscribe()
        with pytest.raises(NoResponderError):
            await eventually_no_responder(client, "node.gone")

    async def test_oversize_envelope_is_refused_before_sending(self, connect: Connect) -> None:
        server, client = await connect(), await connect()
        got: list[Delivery] = []
        await server.subscribe("node.big", got.append)
        with pytest.raises(MessageTooLargeError):
            await client.publish("node.big", Envelope({}, b"x" * (client.max_payload + 1)))
        with pytest.raises(MessageTooLargeError):
            await client.request("node.big", Envelope({}, b"x" * (client.max_payload + 1)), timeout=1)
        await client.publish("node.big", Envelope({}, b"small"))
        await eventually(lambda: len(got) == 1, within=2)
        assert got[0].envelope.body == b"small"

    async def test_members_put_list_delete(self, connect: Connect) -> None:
        transport = await connect()
        store = transport.members
        await store.prepare(10)
        assert await store.list() == {}
        await store.put("node-a", b'{"node_id":"node-a"}', 10)
        await store.put("node-b", b"{}", 10)
        await store.put("node-a", b'{"node_id":"node-a","v":2}', 10)
        assert await store.list() == {"node-a": b'{"node_id":"node-a","v":2}', "node-b": b"{}"}
        await store.delete("node-b")
        assert await store.list() == {"node-a": b'{"node_id":"node-a","v":2}'}

    async def test_members_create_writes_only_where_no_record_is_held(self, connect: Connect) -> None:
        first, second = await connect(), await connect()
        await first.members.prepare(10)
        await second.members.prepare(10)
        claims = [
            store.create("node-c", name.encode(), 10)
            for store, name in [(first.members, "1"), (second.members, "2")] * 3
        ]
        won = await asyncio.gather(*claims)
        assert won.count(True) == 1, "of six claims at once, exactly one is written"
        held = (await first.members.list())["node-c"]
        assert not await second.members.create("node-c", b"late", 10)
        assert (await first.members.list())["node-c"] == held
        await first.members.delete("node-c")
        assert await second.members.create("node-c", b"after a delete", 10)
        assert (await first.members.list())["node-c"] == b"after a delete"

    async def test_members_create_replaces_only_the_record_it_names(self, connect: Connect) -> None:
        first, second = await connect(), await connect()
        await first.members.prepare(10)
        await second.members.prepare(10)
        await first.members.put("node-s", b"stale", 10)
        assert not await first.members.create("node-s", b"mine", 10, replacing=b"something else")
        claims = [
            store.create("node-s", name, 10, replacing=b"stale")
            for store, name in [(first.members, b"1"), (second.members, b"2")] * 3
        ]
        won = await asyncio.gather(*claims)
        assert won.count(True) == 1, "of six takeovers of one stale record, exactly one is written"
        assert (await first.members.list())["node-s"] in (b"1", b"2")

    async def test_members_create_succeeds_once_the_record_expired(self, connect: Connect) -> None:
        transport = await connect()
        await transport.members.prepare(1)
        assert await transport.members.create("node-x", b"old", 1)

        async def gone() -> bool:
            return "node-x" not in await transport.members.list()

        await eventually(gone, within=4)
        assert await transport.members.create("node-x", b"new", 1)
        assert (await transport.members.list())["node-x"] == b"new"

    async def test_members_watch_sees_puts_and_deletes(self, connect: Connect) -> None:
        watcher, writer = await connect(), await connect()
        await watcher.members.prepare(10)
        await writer.members.prepare(10)
        watch = await watcher.members.watch()
        events: list[MemberEvent] = []

        async def collect() -> None:
            async for event in watch:
                events.append(event)

        task = asyncio.create_task(collect())
        try:
            await writer.members.put("node-w", b"1", 10)
            await eventually(lambda: MemberEvent("put", "node-w", b"1") in events, within=2)
            await writer.members.delete("node-w")
            await eventually(
                lambda: any(e.kind == "delete" and e.node_id == "node-w" for e in events), within=2
            )
        finally:
            await watch.stop()
            task.cancel()

    async def test_member_record_expires_after_its_ttl(self, connect: Connect) -> None:
        transport = await connect()
        await transport.members.prepare(1)
        await transport.members.put("node-ttl", b"{}", 1)
        assert "node-ttl" in await transport.members.list()

        async def gone() -> bool:
            return "node-ttl" not in await transport.members.list()

        elapsed = await eventually(gone, within=4)
        assert elapsed > 0.5


async def eventually_no_responder(client: Transport, subject: str) -> None:
    """Some brokers drop an interest a moment after unsubscribe: ask until they say nobody listens."""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        await client.request(subject, Envelope({}, b"{}"), timeout=0.5)
        await asyncio.sleep(0.02)
