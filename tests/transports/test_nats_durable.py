"""The NATS durable store on real nats-server processes: the durable contract on 2.15 and 2.9, then what
is NATS-specific (a broker kill -9, a lost consumer, subjects it must not capture, names, sizes)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from datetime import UTC, datetime
from typing import Any, ClassVar

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext, api

from fastapi_catga import Catga, CatgaSettings, Command, Durable, IdempotencyBehavior, Reject, build, handler
from fastapi_catga.core.envelope import Envelope
from fastapi_catga.exceptions import MessageTooLargeError, NoResponderError, TransportError
from fastapi_catga.transports.durable import DeadLetter, DurableConsumer, DurableDelivery, Queue
from fastapi_catga.transports.nats import NatsTransport
from fastapi_catga.transports.nats.durable import NatsDurable
from fastapi_catga.transports.nats.leases import kv_key
from fastapi_catga.transports.nats.pull import NatsConsumer
from fastapi_catga.transports.nats.streams import safe_name
from tests.polling import eventually
from tests.servers import NatsServer
from tests.transports.conftest import OpenNats
from tests.transports.durable_contract import CMD, LEASE, DurableContract, MakeStore, envelope, fetch_all

pytestmark = pytest.mark.nats

Open = OpenNats
EVT = Queue("evt", "orders.Placed", "mail")


@pytest.fixture(params=["2.15", "2.9"])
def any_server(request: pytest.FixtureRequest) -> NatsServer:
    server: NatsServer = request.getfixturevalue(
        "nats_server" if request.param == "2.15" else "nats_server_2_9"
    )
    return server


class TestNatsDurable(DurableContract):
    @pytest.fixture
    def make_store(self, any_server: NatsServer, open_nats: Open) -> MakeStore:
        async def make() -> NatsDurable:
            return (await open_nats(any_server.url)).durable

        return make


async def prepared(transport: NatsTransport, *queues: Queue) -> NatsDurable:
    await transport.durable.prepare(list(queues) or [CMD], lease=LEASE, dedup_window=60, retention=600)
    return transport.durable


async def raw_js(server: NatsServer) -> tuple[Client, JetStreamContext]:
    nc = await nats.connect(server.url)
    return nc, nc.jetstream()


# -- a broker restart, a lost consumer --------------------------------------------------------------------


async def fetch_like_a_worker(
    consumer: DurableConsumer, *, wait: float, within: float = 10
) -> list[DurableDelivery]:
    """Fetch as the cluster's worker does (back off 0.1 s after a TransportError) until a fetch answers
    without error; every fetch that came back empty must have waited its ``wait``: no hot loop."""
    deadline = time.monotonic() + within
    while True:
        assert time.monotonic() < deadline, f"no answer without error within {within} s"
        started = time.monotonic()
        try:
            got = await consumer.fetch(1, wait=wait)
        except TransportError:
            await asyncio.sleep(0.1)
            continue
        assert got or time.monotonic() - started >= wait * 0.9, "an empty fetch returned before its wait"
        return got


@pytest.mark.parametrize("store", ["kept", "lost"])
async def test_a_message_survives_a_broker_kill_and_fetching_goes_on(
    any_server: NatsServer, open_nats: Open, cluster: str, store: str, caplog: pytest.LogCaptureFixture
) -> None:
    durable = await prepared(await open_nats(any_server.url))
    await durable.append("cmd", CMD.type_name, envelope(1), dedup_id="m1")
    consumer = durable.consumer(CMD, consumer="n1", lease=LEASE)
    any_server.kill()
    with pytest.raises(TransportError):
        await consumer.fetch(1, wait=0.2)
    if store == "lost":
        shutil.rmtree(any_server.data_dir / "jetstream")
    any_server.restart()

    with caplog.at_level(logging.INFO, "fastapi_catga.transports.nats"):
        got = await fetch_like_a_worker(consumer, wait=0.5)
        if store == "kept":
            while not got:
                got = await fetch_like_a_worker(consumer, wait=0.5)
            assert [d.envelope.headers["catga-id"] for d in got] == ["m1"]
            await got[0].ack()
        else:  # the stream and its consumer are gone with the store: the consumer made both again
            assert got == []
            assert caplog.text.count("is gone") == 1
            assert caplog.text.count("made again") == 1
    await durable.append("cmd", CMD.type_name, envelope(2), dedup_id="m2")
    (delivery,) = await fetch_all(consumer, 1)
    assert delivery.envelope.headers["catga-id"] == "m2"
    await delivery.ack()
    await consumer.close()


async def test_a_lost_consumer_is_made_again_logged_once_without_a_hot_loop(
    any_server: NatsServer,
    open_nats: Open,
    cluster: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pulls = [0]
    pull = NatsConsumer._pull

    async def counted(self: NatsConsumer, batch: int, *, expires: float | None) -> list[Any]:
        pulls[0] += 1
        return await pull(self, batch, expires=expires)

    monkeypatch.setattr(NatsConsumer, "_pull", counted)
    durable = await prepared(await open_nats(any_server.url))
    consumer = durable.consumer(CMD, consumer="n1", lease=LEASE)
    assert await consumer.fetch(1, wait=0.1) == []
    nc, js = await raw_js(any_server)
    # Someone deletes the stream, and a foreign stream takes its subjects: it cannot be made again.
    await js.delete_stream(f"CATGA_{cluster}_CMD")
    await js.add_stream(name="FOREIGN", subjects=[f"catga.{cluster}.dur.cmd.>"])
    pulls[0] = 0
    with caplog.at_level(logging.DEBUG, "fastapi_catga.transports.nats"):
        started, fetches = time.monotonic(), 0
        while time.monotonic() - started < 3:
            fetches += 1
            await fetch_like_a_worker(consumer, wait=0.3)
        assert fetches <= 10
        assert pulls[0] <= 2, "one or two pulls find it gone; then only attempts to make it, spaced"
        attempts = caplog.text.count("not made again yet")
        assert 2 <= attempts <= 5, f"{attempts} attempts in 3 s: 0.25, 0.5, 1, 2 s apart"
        await js.delete_stream("FOREIGN")
        await fetch_like_a_worker(consumer, wait=5.5)  # the next attempt, at most 5 s away, succeeds
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert len(loud) == 2, loud
    assert "is gone" in loud[0]
    assert loud[1].endswith("made again")
    await durable.append("cmd", CMD.type_name, envelope(1), dedup_id="m1")
    (delivery,) = await fetch_all(consumer, 1)
    await delivery.ack()
    await consumer.close()
    await nc.close()


async def test_fetch_fails_at_once_when_the_connection_drops(
    nats_server: NatsServer, open_nats: Open
) -> None:
    durable = await prepared(await open_nats(nats_server.url))
    consumer = durable.consumer(CMD, consumer="n1", lease=LEASE)
    fetching = asyncio.ensure_future(consumer.fetch(1, wait=10))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    nats_server.kill()
    with pytest.raises(TransportError, match="lost the NATS connection"):
        await fetching
    assert time.monotonic() - started < 2


# -- what the streams hold ----------------------------------------------------------------------------------


async def test_the_streams_do_not_capture_core_subjects(
    nats_server: NatsServer, open_nats: Open, cluster: str
) -> None:
    transport = await open_nats(nats_server.url)
    await prepared(transport, CMD, EVT)
    with pytest.raises(NoResponderError):  # a stream capturing it would have answered with a PubAck
        await transport.request("node.x", Envelope({}, b"ping"), timeout=1)
    for subject in ("type.orders.Place", "event.orders.Placed", "node.x"):
        await transport.publish(subject, Envelope({}, b"core"))
    nc, js = await raw_js(nats_server)
    for name in ("CMD", "EVT", "DLQ"):
        info = await js.stream_info(f"CATGA_{cluster}_{name}")
        assert info.config.subjects == [f"catga.{cluster}.dur.{name.lower()}.>"]
        assert info.state.messages == 0
    await nc.close()


async def test_layout_names_and_settings(nats_server: NatsServer, open_nats: Open, cluster: str) -> None:
    durable = await prepared(await open_nats(nats_server.url), CMD, EVT)
    await durable.append("evt", EVT.type_name, envelope(1), dedup_id="e1")
    nc, js = await raw_js(nats_server)
    cmd = await js.stream_info(f"CATGA_{cluster}_CMD")
    assert (cmd.config.retention, cmd.config.discard) == (
        api.RetentionPolicy.WORK_QUEUE,
        api.DiscardPolicy.NEW,
    )
    assert (cmd.config.duplicate_window, cmd.config.max_age) == (60, 0)
    evt = await js.stream_info(f"CATGA_{cluster}_EVT")
    assert (evt.config.retention, evt.config.max_age) == (api.RetentionPolicy.LIMITS, 600)
    assert evt.state.messages == 1
    consumer = await js.consumer_info(f"CATGA_{cluster}_CMD", f"cmd_{safe_name(CMD.type_name)}")
    assert consumer.config.filter_subject == f"catga.{cluster}.dur.cmd.{safe_name(CMD.type_name)}"
    assert (consumer.config.ack_wait, consumer.config.max_deliver) == (LEASE, -1)
    assert consumer.config.deliver_policy == api.DeliverPolicy.ALL
    consumer = await js.consumer_info(
        f"CATGA_{cluster}_EVT", f"evt_{safe_name(EVT.group)}_{safe_name(EVT.type_name)}"
    )
    assert consumer.config.deliver_policy == api.DeliverPolicy.NEW
    dlq = await js.stream_info(f"CATGA_{cluster}_DLQ")
    assert (dlq.config.max_msgs_per_subject, dlq.config.max_age) == (1, 600)
    await nc.close()


def test_safe_names_keep_names_apart() -> None:
    assert safe_name("Place-Order2") == "Place-Order2"
    assert safe_name("orders.Place").startswith("orders_Place_")
    names = {safe_name(n) for n in ("a.b", "a_b", "a b", "a:b", "a/b", "a" * 60, "a" * 61)}
    assert len(names) == 7
    assert all(len(n) <= 57 for n in names)
    # evt_<group>_<type> splits one way only: a part with "_" in it is changed and hashed
    assert f"{safe_name('a_b')}_{safe_name('c')}" != f"{safe_name('a')}_{safe_name('b_c')}"
    assert kv_key("workers:m1") == "workers=3Am1"
    assert kv_key("a=b") == "a=3Db" != kv_key("a:b")
    assert kv_key("é") == "=C3=A9"


async def test_an_undecodable_message_is_delivered_with_its_bytes(
    nats_server: NatsServer, open_nats: Open, cluster: str
) -> None:
    durable = await prepared(await open_nats(nats_server.url))
    nc, js = await raw_js(nats_server)
    await js.publish(f"catga.{cluster}.dur.cmd.{safe_name(CMD.type_name)}", b"garbage")
    consumer = durable.consumer(CMD, consumer="n1", lease=LEASE)
    (delivery,) = await fetch_all(consumer, 1)
    assert (delivery.envelope.headers, delivery.envelope.body) == ({}, b"garbage")
    await delivery.drop()
    await nc.close()


async def test_an_envelope_over_the_limit_is_refused_headers_counted(
    nats_server: NatsServer, open_nats: Open
) -> None:
    transport = await open_nats(nats_server.url)
    durable = await prepared(transport)
    body = b"x" * (transport.max_payload - 100)  # fits as a frame, not with the JetStream headers
    with pytest.raises(MessageTooLargeError):
        await durable.append("cmd", CMD.type_name, Envelope({"catga-id": "big"}, body), dedup_id="big" * 20)
    assert transport.connected


async def test_prepare_again_is_quiet_and_other_settings_are_told(
    any_server: NatsServer, open_nats: Open, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = await open_nats(any_server.url), await open_nats(any_server.url)
    with caplog.at_level(logging.WARNING, "fastapi_catga.transports.nats"):
        await asyncio.gather(prepared(a, CMD, EVT), prepared(b, CMD, EVT))
        await prepared(a, CMD, EVT)
        assert caplog.text == ""
        await b.durable.prepare([CMD, EVT], lease=2, dedup_window=30, retention=900)
    assert "made with other settings" in caplog.text
    assert "made with another dedup window" in caplog.text


# -- dead letters -------------------------------------------------------------------------------------------


def letter(n: int, group: str = "workers") -> DeadLetter:
    return DeadLetter(
        id=f"{group}:m{n}",
        queue_kind="cmd",
        message_type=CMD.type_name,
        message_id=f"m{n}",
        group=group,
        reason="attempts",
        error="bad \n thing: ünïcode",
        attempts=3,
        node_id="n1",
        at=datetime(2026, 1, 1, tzinfo=UTC),
    )


async def test_a_letter_beside_a_message_near_the_limit_keeps_the_message_and_cuts_its_error(
    nats_server: NatsServer, open_nats: Open
) -> None:
    """A message just under the payload limit (what a send lets through) dead-lettered with a long
    error: the two must share one NATS message, so the error text gives way, never the message."""
    transport = await open_nats(nats_server.url)
    durable = await prepared(transport)
    body = b"x" * (transport.max_payload - 500)
    big = Envelope({"catga-id": "m1", "catga-type": CMD.type_name}, body)
    long_error = letter(1).model_copy(update={"error": "ошибка 🙈 " * 100})  # ~12 KB as ASCII JSON
    await durable.add_dead_letter(long_error, big)
    found = await durable.dead_letter("workers:m1")
    assert found is not None
    stored, kept = found
    assert kept.body == body and stored.error.endswith("[cut to fit]")
    assert stored.error.startswith("ошибка 🙈") and stored.model_copy(update={"error": ""}) == letter(
        1
    ).model_copy(update={"error": ""})


async def test_a_discarded_dead_letter_can_come_again_at_once(
    any_server: NatsServer, open_nats: Open
) -> None:
    durable = await prepared(await open_nats(any_server.url))
    await durable.add_dead_letter(letter(1), envelope(1))
    assert await durable.remove_dead_letter("workers:m1")
    await durable.add_dead_letter(letter(1), envelope(1))  # replayed, failed again: within 2 minutes
    found = await durable.dead_letter("workers:m1")
    assert found is not None
    assert found[0] == letter(1)
    assert [got.id for got, _ in await durable.dead_letters(10)] == ["workers:m1"]


async def test_dead_letters_are_readable_with_raw_nats(
    nats_server: NatsServer, open_nats: Open, cluster: str
) -> None:
    durable = await prepared(await open_nats(nats_server.url))
    await durable.add_dead_letter(letter(1), envelope(1))
    nc, js = await raw_js(nats_server)
    msg = await js.get_last_msg(f"CATGA_{cluster}_DLQ", f"catga.{cluster}.dur.dlq.{kv_key('workers:m1')}")
    assert msg.headers is not None
    assert DeadLetter.model_validate_json(msg.headers["Catga-Dead-Letter"]) == letter(1)
    assert msg.data == b'{"catga-id":"m1","catga-type":"orders.Place"}\n{"n": 1}'
    await nc.close()


# -- a node that only sends ---------------------------------------------------------------------------------


class Fulfil(Command[str]):
    durable: ClassVar[Durable | bool] = Durable(lease=5)
    order: str


fulfilled: list[str] = []


@handler
async def fulfil(command: Fulfil) -> str:
    fulfilled.append(command.order)
    return command.order


async def test_a_node_without_durable_handlers_enqueues_and_reads_dead_letters_before_any_worker(
    nats_server: NatsServer, cluster: str
) -> None:
    """JetStream has no stream until someone makes it: the first node to need one makes it, be it
    a worker or a node that only enqueues (a gateway), started first or alone."""

    def node(node_id: str, handlers: list[Any]) -> Catga:
        settings = CatgaSettings(transport="nats", nats_url=nats_server.url, cluster=cluster, node_id=node_id)
        return build(settings, handlers=handlers)

    fulfilled.clear()
    gateway = node("gateway", [])
    await gateway.start()
    try:
        assert await gateway.mediator.dead_letters.list() == []
        assert await gateway.mediator.dead_letters.get("workers:nothing") is None
        accepted = await gateway.mediator.enqueue(Fulfil(order="o-1"))
        assert not accepted.duplicate
        worker = node("worker", [fulfil])
        await worker.start()
        try:
            await eventually(lambda: fulfilled == ["o-1"], within=10)
            assert await gateway.mediator.send(Fulfil(order="o-2"), timeout=10) == "o-2"
        finally:
            await worker.stop()
    finally:
        await gateway.stop()


class Bulky(Command[str]):
    durable: ClassVar[Durable | bool] = Durable(attempts=1)
    blob: str


@handler
async def bulky(command: Bulky) -> str:
    raise Reject("не принято 🙈 " * 400)  # ~20 KB as the letter's ASCII JSON


async def test_a_durable_message_near_the_limit_is_dead_lettered_whole_or_refused_up_front(
    nats_server: NatsServer, cluster: str
) -> None:
    settings = CatgaSettings(transport="nats", nats_url=nats_server.url, cluster=cluster, node_id="n")
    catga = build(settings, handlers=[bulky])
    await catga.start()
    try:
        limit, message_id = catga.node.transport.max_payload, "é" * 100  # 6 bytes a character in the letter
        with pytest.raises(MessageTooLargeError, match="payload limit"):  # no room for its letter
            await catga.mediator.enqueue(Bulky(blob="x" * (limit - 1000), message_id=message_id))
        size = limit
        while True:  # the largest the enqueue takes, to 20 bytes: at the edge of the letter's room
            command = Bulky(blob="x" * size, message_id=message_id)
            try:
                await catga.mediator.enqueue(command)
                break
            except MessageTooLargeError:
                size -= 20

        async def letter() -> bool:
            return await catga.mediator.dead_letters.get(f"workers:{command.message_id}") is not None

        await eventually(letter, within=10)
        found = await catga.node.transport.durable.dead_letter(f"workers:{command.message_id}")
        assert found is not None
        stored, kept = found
        assert stored.reason == "rejected" and stored.error.startswith("не принято 🙈")
        assert json.loads(kept.body)["blob"] == command.blob
    finally:
        await catga.stop()


class Charge(Command[str]):  # not durable: the node has no durable type at all
    card: str


charged: list[str] = []


@handler
async def charge(command: Charge) -> str:
    charged.append(command.message_id)
    await asyncio.sleep(0.2)
    return f"charged {command.card}"


async def test_the_idempotency_behavior_works_on_a_cluster_with_no_durable_type(
    nats_server: NatsServer, cluster: str
) -> None:
    """Its done records live in the bucket durable delivery uses: the first node to need it makes
    it (every send failed with "JetStream did not answer" where no durable type made it first)."""

    def node(node_id: str) -> Catga:
        settings = CatgaSettings(transport="nats", nats_url=nats_server.url, cluster=cluster, node_id=node_id)
        return build(settings, handlers=[charge], behaviors=[IdempotencyBehavior(window=60)])

    charged.clear()
    nodes = [node("a"), node("b")]
    for catga in nodes:
        await catga.start()
    try:
        command = Charge(card="4242")
        answers = await asyncio.gather(
            *(catga.mediator.send_to_node(command, catga.node.node_id, timeout=10) for catga in nodes)
        )
        assert answers == ["charged 4242"] * 2
        assert charged == [command.message_id], "each node ran it: the done record was not shared"
    finally:
        for catga in nodes:
            await catga.stop()
