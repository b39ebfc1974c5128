"""NatsTransport on real nats-server processes: the contract on 2.15 and 2.9, then what is NATS-specific."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import json
import logging
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from fastapi_catga import CatgaSettings, build
from fastapi_catga.core.envelope import Envelope, pack
from fastapi_catga.exceptions import (
    ConfigurationError,
    MessageTooLargeError,
    MessageValidationError,
    NoResponderError,
    RequestTimeoutError,
    TransportError,
)
from fastapi_catga.transports.base import Delivery, MemberEvent, MemberWatch, Transport
from fastapi_catga.transports.nats import NatsTransport
from fastapi_catga.transports.nats import wire as nats_wire
from tests.polling import eventually
from tests.servers import NatsServer, free_port
from tests.transports.conftest import OpenNats
from tests.transports.contract import Connect, TransportContract, echo

pytestmark = pytest.mark.nats

Open = OpenNats


class TestNatsTransport(TransportContract):
    @pytest.fixture
    def server(self, nats_server: NatsServer) -> NatsServer:
        return nats_server

    @pytest.fixture
    async def connect(self, server: NatsServer, open_nats: Open) -> AsyncIterator[Connect]:
        async def connect() -> Transport:
            return await open_nats(server.url)

        yield connect


class TestNatsTransportOnServer29(TestNatsTransport):
    @pytest.fixture
    def server(self, nats_server_2_9: NatsServer) -> NatsServer:
        return nats_server_2_9


@pytest.fixture(params=["2.15", "2.9"])
def any_server(request: pytest.FixtureRequest) -> NatsServer:
    server: NatsServer = request.getfixturevalue(
        "nats_server" if request.param == "2.15" else "nats_server_2_9"
    )
    return server


class Collector:
    """Runs ``async for`` over a watch in a task, keeping every event."""

    def __init__(self, watch: MemberWatch) -> None:
        self.events: list[MemberEvent] = []
        self.task = asyncio.get_running_loop().create_task(self._collect(watch))

    async def _collect(self, watch: MemberWatch) -> None:
        async for event in watch:
            self.events.append(event)

    def saw(self, kind: str, node_id: str) -> bool:
        return any(e.kind == kind and e.node_id == node_id for e in self.events)


# -- connecting -----------------------------------------------------------------------------------


async def test_connect_to_a_dead_port_fails_within_connect_timeout() -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    transport = NatsTransport(url, connect_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(TransportError, match=url):
        await transport.connect()
    assert 0.9 < time.monotonic() - started < 2.0
    assert not transport.connected
    await transport.aclose()


async def test_comma_separated_servers_form_one_pool(nats_server: NatsServer, open_nats: Open) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    transport = await open_nats(f"{dead}, {nats_server.url}")
    assert transport.servers == [dead, nats_server.url]
    await transport.subscribe("node.a", echo("a"))
    reply = await transport.request("node.a", Envelope({}, b"hi"), timeout=2)
    assert reply.body == b"hi"


async def test_a_node_record_over_the_servers_limit_names_the_setting_at_start(
    tmp_path: Path, cluster: str
) -> None:
    """The server's max_payload, known once connected, is what the record must fit (not
    CATGA_MAX_PAYLOAD's 1 MiB): a clear start-up error, not the store's own."""
    config = tmp_path / "nats.conf"
    config.write_text("max_payload: 4096\n")
    with NatsServer(extra_args=["-c", str(config)]) as server:
        settings = CatgaSettings(
            transport="nats", nats_url=server.url, cluster=cluster, node_id="n", metadata={"note": "é" * 2500}
        )
        with pytest.raises(ConfigurationError, match="shorten CATGA_METADATA"):
            await build(settings, handlers=[]).start()


async def test_max_payload_is_the_servers_limit_headers_included(tmp_path: Path, cluster: str) -> None:
    config = tmp_path / "nats.conf"
    config.write_text("max_payload: 4096\n")
    with NatsServer(extra_args=["-c", str(config)]) as server:
        transport = NatsTransport(server.url, cluster=cluster)
        await transport.connect()
        try:
            assert transport.max_payload == 4096
            got: list[Delivery] = []
            await transport.subscribe("node.big", got.append)
            headers = {"catga-id": "x" * 100}
            fits = 4096 - len(pack(Envelope(headers)))  # the frame: header line, newline, body
            await transport.publish("node.big", Envelope(headers, b"a" * fits))
            with pytest.raises(MessageTooLargeError):  # the server would drop the connection for it
                await transport.publish("node.big", Envelope(headers, b"a" * (fits + 1)))
            await eventually(lambda: len(got) == 1, within=2)
            assert transport.connected
        finally:
            await transport.aclose()


async def test_aclose_is_idempotent_and_ends_everything(nats_server: NatsServer, cluster: str) -> None:
    transport = NatsTransport(nats_server.url, cluster=cluster)
    states: list[bool] = []
    transport.add_connection_listener(states.append)
    await transport.connect()
    subscription = await transport.subscribe("node.a", echo("a"))
    await transport.members.prepare(10)
    collector = Collector(await transport.members.watch())
    await transport.aclose()
    await transport.aclose()
    await subscription.unsubscribe()
    await eventually(collector.task.done, within=1)
    assert states == [True]
    assert not transport.connected
    with pytest.raises(TransportError):
        await transport.request("node.a", Envelope(), timeout=1)


async def test_prepare_without_jetstream_says_so(cluster: str) -> None:
    with NatsServer(jetstream=False) as server:
        transport = NatsTransport(server.url, cluster=cluster)
        await transport.connect()
        try:
            with pytest.raises(TransportError, match="-js"):
                await transport.members.prepare(10)
        finally:
            await transport.aclose()


@pytest.mark.parametrize(
    ("servers", "cluster", "complaint"),
    [(" , ", "catga", "no NATS server URL"), ("nats://127.0.0.1:1", "a.b", "cluster name 'a.b'")],
)
def test_bad_settings_fail_at_construction(servers: str, cluster: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError, match=complaint):
        NatsTransport(servers, cluster=cluster)


@pytest.mark.parametrize(
    ("servers", "complaint"),
    [
        ("nats://", "names no host"),
        ("nats://127.0.0.1:99999", "port is no number"),
        ("nats://127.0.0.1:4222,bad url", "host holds a space"),  # nats-py took it, and failed later
        ("http://127.0.0.1:4222", "scheme is not one of"),
        ("nats://app:se/cret@127.0.0.1:4222", "port is no number"),  # a / not percent-encoded
        ("nats://app:se,cret@127.0.0.1:4222", "port is no number"),  # the , splits the list
        ("nats://app:secret@[::1", "is no IPv6 address"),  # urllib's ValueError
        ("nats://app:secret@[zz]:4222", "is no IPv6 address"),
    ],
)
def test_a_malformed_url_is_a_configuration_error_that_shows_no_password(
    servers: str, complaint: str
) -> None:
    with pytest.raises(ConfigurationError, match=f"invalid CATGA_NATS_URL .*{complaint}") as raised:
        NatsTransport(servers)
    assert "cret" not in str(raised.value)


def test_missing_nats_py_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nats", None)
    for name in [name for name in sys.modules if name.startswith("fastapi_catga.transports.nats")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r'pip install "fastapi-catga\[nats\]"'):
        importlib.import_module("fastapi_catga.transports.nats")


# -- messaging ------------------------------------------------------------------------------------


async def test_publish_delivers_without_reply(nats_server: NatsServer, open_nats: Open) -> None:
    subscriber, publisher = await open_nats(nats_server.url), await open_nats(nats_server.url)
    got: list[Delivery] = []
    await subscriber.subscribe("event.Happened", got.append)
    await publisher.publish("event.Happened", Envelope({"catga-type": "Happened"}, b"1"))  # returns None
    await eventually(lambda: len(got) == 1, within=2)
    assert got[0].reply is None
    assert got[0].envelope == Envelope({"catga-type": "Happened"}, b"1")


async def test_a_hundred_concurrent_requests(nats_server: NatsServer, open_nats: Open) -> None:
    server, client = await open_nats(nats_server.url), await open_nats(nats_server.url)
    await server.subscribe("type.Work", echo("a"), queue="workers")
    replies = await asyncio.gather(
        *(client.request("type.Work", Envelope({"n": str(n)}, b"{}"), timeout=5) for n in range(100))
    )
    assert sorted(int(reply.headers["n"]) for reply in replies) == list(range(100))


async def test_messages_are_taken_as_nats_py_reads_them(nats_server: NatsServer, open_nats: Open) -> None:
    """No queue and task of nats-py's per subscription: `_Direct` stands in for its queue."""
    server, client = await open_nats(nats_server.url), await open_nats(nats_server.url)
    subscription = await server.subscribe("node.a", echo("a"))
    assert nats_wire.DIRECT
    assert isinstance(subscription.sub._pending_queue, nats_wire._Direct)
    assert subscription.sub._wait_for_msgs_task is None
    reply = await client.request("node.a", Envelope({}, b"ping"), timeout=2)
    assert reply.body == b"ping"
    assert subscription.sub.pending_bytes == 0  # nats-py's count of what waits unread


async def test_without_direct_delivery_nats_py_callbacks_serve(
    nats_server: NatsServer, open_nats: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A nats-py whose subscriptions have no queue to stand in for gets the documented callbacks."""
    monkeypatch.setattr(nats_wire, "DIRECT", False)
    server, client = await open_nats(nats_server.url), await open_nats(nats_server.url)
    got: list[Delivery] = []
    subscription = await server.subscribe("node.a", echo("a"))
    await server.subscribe("event.Happened", got.append)
    assert subscription.sub._wait_for_msgs_task is not None
    reply = await client.request("node.a", Envelope({}, b"ping"), timeout=2)
    assert reply.body == b"ping"
    await client.publish("event.Happened", Envelope({}, b"1"))
    await eventually(lambda: len(got) == 1, within=2)


async def test_plain_messages_skip_nats_pys_msg_and_the_rest_take_its_path(nats_server: NatsServer) -> None:
    """nats-py's parser hands a plain message to a `_Direct` subscription's taker as its subject,
    reply and payload; one with headers, and every message of other subscriptions on the same
    connection, go through nats-py's own path. nats-py's counts hold for both."""
    nc = await nats.connect(nats_server.url)
    taken: list[tuple[str, str, bytes, dict[str, str] | None]] = []
    theirs: list[bytes] = []

    async def callback(msg: Msg) -> None:
        theirs.append(msg.data)

    built: list[bytes] = []  # the messages nats-py made a Msg of
    build_message = nc._build_message

    def spied(sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any) -> Any:
        built.append(data)
        return build_message(sid, subject, reply, data, headers)

    nc._build_message = spied  # type: ignore[method-assign]
    try:
        sub = await nats_wire.subscribe(nc, "wire.direct", lambda *message: taken.append(message))
        assert "_process_msg" in vars(nc), "the connection's parser hands messages over directly"
        await nc.subscribe("wire.theirs", cb=callback)
        await nc.publish("wire.direct", b"plain", reply="wire.back")
        await nc.publish("wire.direct", b"with headers", headers={"X-Test": "1"})
        await nc.publish("wire.theirs", b"to nats-py")
        await eventually(lambda: len(taken) == 2 and theirs == [b"to nats-py"], within=2)
        assert taken[0] == ("wire.direct", "wire.back", b"plain", None)
        assert taken[1][2:] == (b"with headers", {"X-Test": "1"})
        assert sub.delivered == 2 and sub.pending_bytes == 0
        assert nc.stats["in_msgs"] == 3
        assert sorted(built) == [b"to nats-py", b"with headers"], "no Msg for the plain one"
    finally:
        await nc.close()


class Quiet:
    """A connection of nats-py with a `wire.subscribe` subscription, that a listener on another
    connection watches; counts the flusher's wake-ups (each a turn of the event loop later)."""

    def __init__(self, nc: Client, listener: Client) -> None:
        self.nc, self.listener = nc, listener
        self.heard: list[bytes] = []
        self.taken: list[bytes] = []
        self.kicks = 0
        flush_pending = nc._flush_pending

        def kick(*args: Any, **kwargs: Any) -> Any:
            self.kicks += 1
            return flush_pending(*args, **kwargs)

        nc._flush_pending = kick  # type: ignore[method-assign]

    @classmethod
    async def open(cls, url: str) -> Quiet:
        nc, listener = await nats.connect(url), await nats.connect(url)
        quiet = cls(nc, listener)

        async def heard(msg: Msg) -> None:
            quiet.heard.append(msg.data)

        await listener.subscribe("wire.out", cb=heard)
        await listener.flush()
        await nats_wire.subscribe(nc, "wire.in", lambda *message: quiet.taken.append(message[2]))
        await nc.flush()
        # nats-server 2.15 may still miss, for a millisecond or so, a subscription whose PONG came
        # back when another connection publishes: probe until one arrives.
        for _ in range(100):
            await listener.publish("wire.in", b"probe")
            with contextlib.suppress(AssertionError):
                await eventually(lambda: bool(quiet.taken), within=0.05)
                break
        await listener.flush()  # the server has every probe: routed to nc before its PONG
        await nc.flush()
        quiet.taken.clear()
        return quiet

    async def one_message_in(self) -> None:
        """A read of the connection that brings one message and nothing else."""
        taken = len(self.taken)
        await self.listener.publish("wire.in", b"request")
        await eventually(lambda: self.taken[taken:] == [b"request"], within=2)
        assert nats_wire._pace(self.nc).quiet

    async def close(self) -> None:
        await self.nc.close()
        await self.listener.close()


async def test_after_a_read_of_one_message_the_first_sent_is_written_at_once(nats_server: NatsServer) -> None:
    """A request at a time, or its reply, goes to the socket as it is sent, not a turn of the event
    loop later through nats-py's flusher; what follows in the same turn is buffered behind it."""
    quiet = await Quiet.open(nats_server.url)
    try:
        await quiet.one_message_in()
        kicks = quiet.kicks
        await nats_wire.publish(quiet.nc, "wire.out", b"first", "", 1)
        assert quiet.nc._pending == [] and quiet.kicks == kicks, "written at once"
        await nats_wire.publish(quiet.nc, "wire.out", b"second", "", 1)
        assert quiet.kicks == kicks + 1, "the next one waits for the flusher"
        await eventually(lambda: quiet.heard == [b"first", b"second"], within=2)
    finally:
        await quiet.close()


async def test_where_nats_pys_tcp_transport_is_unknown_every_message_waits_for_the_flusher(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nats_wire, "WRITE_NOW", False)
    quiet = await Quiet.open(nats_server.url)
    try:
        await quiet.one_message_in()
        kicks = quiet.kicks
        await nats_wire.publish(quiet.nc, "wire.out", b"buffered", "", 1)
        assert quiet.kicks == kicks + 1
        await eventually(lambda: quiet.heard == [b"buffered"], within=2)
    finally:
        await quiet.close()


async def test_a_message_written_at_once_never_overtakes_what_is_buffered(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What nats-py buffered goes first; and bytes the socket has not taken yet (a slow socket)
    leave the message to the flusher, which waits for them: a quiet connection then buffers as usual."""
    quiet = await Quiet.open(nats_server.url)
    try:
        await quiet.one_message_in()
        await quiet.nc.publish("wire.out", b"buffered by nats-py")
        await nats_wire.publish(quiet.nc, "wire.out", b"after it", "", 1)
        assert quiet.nc._pending[-1].endswith(b"after it\r\n")
        await eventually(lambda: quiet.heard == [b"buffered by nats-py", b"after it"], within=2)

        await quiet.one_message_in()
        writer = quiet.nc._transport._io_writer  # type: ignore[union-attr]
        monkeypatch.setattr(writer.transport, "get_write_buffer_size", lambda: 1)  # a slow socket
        kicks = quiet.kicks
        await nats_wire.publish(quiet.nc, "wire.out", b"behind the unwritten", "", 1)
        assert quiet.kicks == kicks + 1, "buffered for the flusher, which writes after the transport's bytes"
        monkeypatch.undo()
        await eventually(lambda: quiet.heard[-1] == b"behind the unwritten", within=2)
    finally:
        await quiet.close()


async def test_a_quiet_connection_that_is_down_keeps_the_message_for_the_reconnect(
    nats_server: NatsServer,
) -> None:
    """Never written to a socket that is gone: it waits in nats-py's buffer, which goes out when
    the connection is back (after the subscriptions, which nats-py makes again first)."""
    nc = await nats.connect(nats_server.url, reconnect_time_wait=0.05, max_reconnect_attempts=-1)
    heard: list[bytes] = []
    try:
        await nats_wire.subscribe(nc, "wire.in", lambda *message: None)
        await nats_wire.subscribe(nc, "wire.out", lambda *message: heard.append(message[2]))
        nats_server.kill()
        await eventually(lambda: nc.is_reconnecting, within=5)
        nats_wire._pace(nc).quiet = True  # as after a read of one message, just before the loss
        await nats_wire.publish(nc, "wire.out", b"while down", "", 1)
        assert nc._pending and nc._pending[-1].endswith(b"while down\r\n")
        nats_server.restart()
        await eventually(lambda: heard == [b"while down"], within=10)
    finally:
        if not nats_server.running:
            nats_server.restart()
        await nc.close()


async def test_a_subject_that_is_no_utf8_is_dropped_and_the_connection_reads_on(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-py would take its connection down for it (its Msg decodes the subject); here it is
    dropped with a warning, and the next message still comes."""
    nc = await nats.connect(nats_server.url)
    taken: list[str] = []
    try:
        await nats_wire.subscribe(nc, "wire.*", lambda subject, *_: taken.append(subject))
        await nc.flush()  # the server has the SUB
        host, port = nats_server.url.removeprefix("nats://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        await reader.readline()  # INFO
        # A PING answered first: nats-server 2.15 may lose a new connection's very first PUB to a
        # subscription it only just took (see benchmarks/README.md, sixth pass).
        writer.write(b'CONNECT {"verbose":false}\r\nPING\r\n')
        assert await reader.readline() == b"PONG\r\n"
        with caplog.at_level(logging.WARNING):
            writer.write(b"PUB wire.\xff 2\r\nhi\r\nPUB wire.ok 2\r\nok\r\n")
            await writer.drain()
            await eventually(lambda: taken == ["wire.ok"], within=2)
        assert "no UTF-8" in caplog.text and nc.is_connected
        writer.close()
    finally:
        await nc.close()


@pytest.mark.parametrize("subject", ["node.has space", "type.a\r\nPUB x 1", "type.*", "node.>", "a..b", ""])
async def test_a_subject_nats_cannot_carry_is_refused_before_anything_is_sent(
    nats_server: NatsServer, open_nats: Open, subject: str
) -> None:
    client = await open_nats(nats_server.url)
    with pytest.raises(MessageValidationError, match="cannot be a NATS subject"):
        await client.request(subject, Envelope({}, b"x"), timeout=1)
    with pytest.raises(MessageValidationError, match="cannot be a NATS subject"):
        await client.publish(subject, Envelope({}, b"x"))
    server = await open_nats(nats_server.url)
    await server.subscribe("node.a", echo("a"))
    assert (await client.request("node.a", Envelope({}, b"ping"), timeout=2)).body == b"ping"
    assert client.connected


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "nats-py callback"])
async def test_a_taker_that_raises_in_nats_pys_reader_leaves_the_connection_reading(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, direct: bool
) -> None:
    """What `wire.subscribe` hands messages to runs in nats-py's reader: an error there is logged,
    never taken for a broken connection, and the next message still comes."""
    monkeypatch.setattr(nats_wire, "DIRECT", direct)
    nc = await nats.connect(nats_server.url)
    got: list[bytes] = []

    def take(subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        if data == b"boom":
            raise RuntimeError("a bug where messages are taken")
        got.append(data)

    try:
        await nats_wire.subscribe(nc, "wire.test", take)
        with caplog.at_level(logging.ERROR):
            await nc.publish("wire.test", b"boom")
            await nc.publish("wire.test", b"after")
            await eventually(lambda: got == [b"after"], within=2)
        assert "a bug where messages are taken" in caplog.text
        assert nc.is_connected
    finally:
        await nc.close()


async def test_no_responder_after_the_subscriber_closed(nats_server: NatsServer, open_nats: Open) -> None:
    server, client = await open_nats(nats_server.url), await open_nats(nats_server.url)
    await server.subscribe("node.a", echo("a"))
    await server.aclose()
    with pytest.raises(NoResponderError):
        await client.request("node.a", Envelope(), timeout=2)


# -- broker faults --------------------------------------------------------------------------------


async def _request_ok(client: NatsTransport) -> bool:
    reply = await client.request("node.a", Envelope({}, b"ping"), timeout=0.5)
    return reply.body == b"ping"


@pytest.mark.parametrize("store", ["kept", "lost"])
async def test_kill_and_restart_server(nats_server: NatsServer, open_nats: Open, store: str) -> None:
    server, client = await open_nats(nats_server.url), await open_nats(nats_server.url)
    states: list[bool] = []
    client.add_connection_listener(states.append)
    await server.subscribe("node.a", echo("a"))
    await client.members.prepare(10)
    await client.members.put("node-a", b"{}", 10)
    collector = Collector(await client.members.watch())

    nats_server.kill()
    await eventually(lambda: states == [False], within=2)
    await eventually(collector.task.done, within=1, message="a watch ends when the connection breaks")
    with pytest.raises(TransportError):
        await client.request("node.a", Envelope(), timeout=1)
    if store == "lost":
        shutil.rmtree(nats_server.data_dir / "jetstream")
    nats_server.restart()

    ignore = (TransportError, RequestTimeoutError)
    elapsed = await eventually(lambda: _request_ok(client), within=2, ignore=ignore)
    logging.getLogger(__name__).info("request works again %.3f s after the restart", elapsed)
    assert states == [False, True]
    await client.members.prepare(10)
    await client.members.put("node-b", b"{}", 10)
    expected = {"node-a", "node-b"} if store == "kept" else {"node-b"}
    assert set(await client.members.list()) == expected
    collector = Collector(await client.members.watch())
    await client.members.put("node-c", b"{}", 10)
    await eventually(lambda: collector.saw("put", "node-c"), within=2)


async def test_paused_server_gives_timeouts_and_aclose_returns(nats_server: NatsServer, cluster: str) -> None:
    transport = NatsTransport(nats_server.url, cluster=cluster, connect_timeout=0.5)
    await transport.connect()
    await transport.members.prepare(10)
    await transport.subscribe("node.a", echo("a"))
    nats_server.pause()
    try:
        with pytest.raises(RequestTimeoutError):
            await transport.request("node.a", Envelope(), timeout=0.3)
        started = time.monotonic()
        with pytest.raises(TransportError, match="did not answer in time"):
            await transport.members.put("node-p", b"{}", 10)
        assert time.monotonic() - started < 1.0
        started = time.monotonic()
        await transport.aclose()  # gives up confirming the unsubscribes after connect_timeout
        assert time.monotonic() - started < 1.0
    finally:
        nats_server.resume()


BIG = b"x" * 500_000  # 60 of them: 30 MB for a server that reads nothing, past every buffer


@pytest.fixture(params=[True, False], ids=["direct", "nats-py publish"])
async def stalled(
    request: pytest.FixtureRequest, nats_server: NatsServer, cluster: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[NatsTransport]:
    """A transport whose server is stopped: the socket fills, then nats-py's 2 MiB buffer, past
    which its publish waits for the flusher without end (and swallows the cancellation)."""
    monkeypatch.setattr(nats_wire, "DIRECT", request.param)
    transport = NatsTransport(nats_server.url, cluster=cluster, connect_timeout=0.5)
    await transport.connect()
    nats_server.pause()
    try:
        yield transport
    finally:
        nats_server.resume()
        await transport.aclose()


async def test_a_stalled_server_with_a_full_send_buffer_fails_requests_at_their_deadline(
    stalled: NatsTransport, caplog: pytest.LogCaptureFixture
) -> None:
    started = time.monotonic()
    outcomes = await asyncio.gather(
        *(stalled.request("node.a", Envelope({}, BIG), timeout=1.0) for _ in range(60)),
        return_exceptions=True,
    )
    assert time.monotonic() - started < 4.0  # none hangs
    assert all(isinstance(outcome, RequestTimeoutError) for outcome in outcomes), outcomes[:3]
    # Each request's reply future, failed by its deadline while the request waited on the buffer,
    # is retrieved: no "Future exception was never retrieved" error per request in the app's log.
    del outcomes
    gc.collect()
    assert not [record for record in caplog.records if "never retrieved" in record.getMessage()]


async def test_a_stalled_server_with_a_full_send_buffer_fails_an_event_publish_in_time(
    stalled: NatsTransport,
) -> None:
    """connect_timeout at most, then `TransportError` (nats-py's own wait returned nothing, or never)."""
    started = time.monotonic()
    outcomes = await asyncio.gather(
        *(stalled.publish("event.Big", Envelope({}, BIG)) for _ in range(60)), return_exceptions=True
    )
    assert time.monotonic() - started < 3.0
    failed = [outcome for outcome in outcomes if isinstance(outcome, TransportError)]
    assert failed, "no publish was told the server did not take it"
    assert all(outcome is None or isinstance(outcome, TransportError) for outcome in outcomes)
    assert "did not answer in time" in str(failed[0])


async def test_a_stalled_server_fails_publishes_sent_one_at_a_time_in_time(stalled: NatsTransport) -> None:
    """One publish per turn of the event loop: each time the flusher writes what there is to the
    socket's transport, which must then make the next publishes wait (on CPython 3.12.0-3.12.8 and
    3.13.0-3.13.1 its ``writelines`` does not: gh-127655), not take everything into memory."""
    started = time.monotonic()
    with pytest.raises(TransportError, match="did not answer in time"):
        for _ in range(60):  # 30 MB at most
            await stalled.publish("event.Big", Envelope({}, BIG))
            await asyncio.sleep(0.01)  # the flusher writes
    assert time.monotonic() - started < 3.0


# -- membership -----------------------------------------------------------------------------------


async def test_watch_sees_expiry_on_2_15(nats_server: NatsServer, open_nats: Open) -> None:
    transport = await open_nats(nats_server.url)
    await transport.members.prepare(1)
    watch = await transport.members.watch()
    collector = Collector(watch)
    await transport.members.put("node-x", b"{}", 1)
    await eventually(lambda: collector.saw("put", "node-x"), within=2)
    elapsed = await eventually(lambda: collector.saw("delete", "node-x"), within=4)
    assert elapsed > 0.5
    assert "node-x" not in await transport.members.list()
    assert [e.expired for e in collector.events if e.kind == "delete"] == [True], "an expiry, not a leave"
    await transport.members.put("node-y", b"{}", 10)
    await transport.members.delete("node-y")  # a node leaving
    await eventually(lambda: collector.saw("delete", "node-y"), within=2)
    assert [e.expired for e in collector.events if e.kind == "delete"] == [True, False]
    await watch.stop()
    await eventually(collector.task.done, within=1)


async def test_list_drops_an_expired_key_on_2_9(nats_server_2_9: NatsServer, open_nats: Open) -> None:
    transport = await open_nats(nats_server_2_9.url)
    await transport.members.prepare(1)
    await transport.members.put("node-x", b"{}", 1)
    assert "node-x" in await transport.members.list()

    async def gone() -> bool:
        return "node-x" not in await transport.members.list()

    assert await eventually(gone, within=4) > 0.5


async def test_put_restarts_the_expiry(any_server: NatsServer, open_nats: Open) -> None:
    transport = await open_nats(any_server.url)
    await transport.members.prepare(1)
    started = time.monotonic()
    while time.monotonic() - started < 2.5:  # a heartbeat every 0.3 s outlives the 1 s TTL
        await transport.members.put("node-h", b"{}", 1)
        assert "node-h" in await transport.members.list()
        await asyncio.sleep(0.3)


async def test_record_is_readable_json_for_raw_nats(nats_server: NatsServer, open_nats: Open) -> None:
    transport = await open_nats(nats_server.url)
    await transport.members.prepare(10)
    await transport.members.put("node-1.a", b'{"node_id": "node-1.a"}', 10)
    nc = await nats.connect(nats_server.url)
    try:
        kv = await nc.jetstream().key_value(transport.members.bucket)
        entry = await kv.get("node-1.a")
        assert entry.value is not None
        assert json.loads(entry.value) == {"node_id": "node-1.a"}
    finally:
        await nc.close()


async def test_prepare_is_idempotent_and_races_safely(
    any_server: NatsServer, open_nats: Open, caplog: pytest.LogCaptureFixture
) -> None:
    a, b, c = [await open_nats(any_server.url) for _ in range(3)]
    await asyncio.gather(a.members.prepare(5), b.members.prepare(5), a.members.prepare(5))
    with caplog.at_level(logging.WARNING, "fastapi_catga.transports.nats"):
        await c.members.prepare(7)  # another TTL: the bucket stays as it is, with a warning
    assert "made with another TTL" in caplog.text
    await c.members.put("node-c", b"{}", 7)
    assert await a.members.list() == {"node-c": b"{}"}


async def test_watch_can_stop_and_start_again(nats_server: NatsServer, open_nats: Open) -> None:
    transport = await open_nats(nats_server.url)
    await transport.members.prepare(10)
    await transport.members.put("node-old", b"1", 10)
    first = Collector(await transport.members.watch())
    await eventually(lambda: first.saw("put", "node-old"), within=2, message="a watch starts with the values")
    await transport.members.delete("node-old")
    await eventually(lambda: first.saw("delete", "node-old"), within=2)
    await (await transport.members.watch()).stop()
    second = Collector(await transport.members.watch())
    await transport.members.put("node-new", b"2", 10)
    await eventually(lambda: second.saw("put", "node-new") and first.saw("put", "node-new"), within=2)
    assert not any(e.node_id == "node-old" and e.kind == "put" for e in second.events)


async def test_invalid_node_id_is_refused(nats_server: NatsServer, open_nats: Open) -> None:
    transport = await open_nats(nats_server.url)
    await transport.members.prepare(10)
    with pytest.raises(ValueError, match="node:1"):
        await transport.members.put("node:1", b"{}", 10)


async def test_bucket_made_by_2_9_keeps_working_after_an_upgrade(
    nats_server_2_9: NatsServer, cluster: str
) -> None:
    old = NatsTransport(nats_server_2_9.url, cluster=cluster)
    await old.connect()
    await old.members.prepare(10)
    await old.members.put("node-old", b"1", 10)
    await old.aclose()
    nats_server_2_9.stop()
    # The same store under 2.15 (the last -sd wins): its stream allows no per-key TTLs, so puts send none.
    with NatsServer(extra_args=["-sd", str(nats_server_2_9.data_dir)]) as upgraded:
        new = NatsTransport(upgraded.url, cluster=cluster)
        await new.connect()
        try:
            await new.members.prepare(10)
            await new.members.put("node-new", b"2", 10)
            assert await new.members.list() == {"node-old": b"1", "node-new": b"2"}
        finally:
            await new.aclose()


async def test_close_ends_a_reconnect_task_that_survived_its_cancellation(
    nats_server: NatsServer, cluster: str
) -> None:
    """nats-py cancels its reconnect task once; on 3.11 ``asyncio.wait_for`` may swallow that when a
    connect attempt fails at the same moment, and the task then retries a dead server for ever:
    ``asyncio.run`` (uvicorn's, the CLI's) waited for it as the process exited, and hung."""
    transport = NatsTransport(nats_server.url, cluster=cluster)
    await transport.connect()
    nc = transport._connection.nc
    assert nc is not None
    swallowed: list[bool] = []

    async def reconnecting() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed.append(True)  # the race: this cancellation is lost

    task = asyncio.get_running_loop().create_task(reconnecting())
    nc._reconnection_task = task
    await asyncio.sleep(0)
    await transport.aclose()
    assert swallowed and task.done()
