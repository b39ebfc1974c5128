"""The in-memory durable store passes the durable contract."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from fastapi_catga.core.envelope import Envelope
from fastapi_catga.testing import InMemoryBroker, InMemoryTransport
from fastapi_catga.transports.durable import DeadLetter, DurableStore, Queue
from tests.transports.durable_contract import CMD, LEASE, DurableContract, MakeStore

EVT = Queue("evt", "orders.Placed", "mail")


class TestMemoryDurable(DurableContract):
    @pytest.fixture
    def make_store(self) -> MakeStore:
        broker = InMemoryBroker()

        async def make() -> DurableStore:
            transport = InMemoryTransport(broker, cluster="durable")
            await transport.connect()
            return transport.durable

        return make


def envelope(message_id: str) -> Envelope:
    return Envelope({"catga-id": message_id, "catga-type": "orders.Place"}, b"{}")


async def test_nothing_kept_grows_with_the_messages_that_went_through() -> None:
    """A process on the embedded transport runs for weeks: what every group has read leaves its
    queue, and ended leases, done records and dedup ids are swept as their tables grow."""
    now = [0.0]
    broker = InMemoryBroker(lambda: now[0])
    transport = InMemoryTransport(broker, cluster="growth")
    await transport.connect()
    store = transport.durable
    await store.prepare([CMD, EVT], lease=LEASE, dedup_window=60.0, retention=3600.0)
    commands, events = (
        store.consumer(CMD, consumer="n1", lease=LEASE),
        store.consumer(EVT, consumer="n1", lease=LEASE),
    )
    for minute in range(5):
        now[0] = minute * 61.0  # past the dedup window and every lease and record of the last minute
        for n in range(3000):
            message_id = f"{minute}-{n}"
            await store.append("cmd", CMD.type_name, envelope(message_id), dedup_id=f"cmd-{message_id}")
            await store.append("evt", EVT.type_name, envelope(message_id), dedup_id=f"evt-{message_id}")
            assert await store.claim(message_id, "n1", LEASE)
            assert await store.commit(message_id, "n1", b"null", 30.0)
        for consumer in (commands, events):
            while deliveries := await consumer.fetch(500, 0):
                for delivery in deliveries:
                    await delivery.ack()
    sizes = broker.durable.sizes()
    # 15,000 of each went through; a minute's worth (3,000 a table) is all that may be live.
    assert sizes["entries"] == 0
    assert sizes["leases"] == 0
    assert 3000 <= sizes["done"] <= 6000
    assert 3000 <= sizes["dedup"] <= 12_000  # two dedup ids a message
    # and what is live still counts: the last minute's ids are duplicates, its records done
    assert (await store.append("cmd", CMD.type_name, envelope("4-7"), dedup_id="cmd-4-7")).duplicate
    assert await store.done("4-7") == b"null"
    assert await store.done("3-7") is None


async def test_a_group_that_lags_keeps_what_it_has_not_read_and_a_new_one_starts_at_what_is_queued() -> None:
    broker = InMemoryBroker()
    transport = InMemoryTransport(broker, cluster="lag")
    await transport.connect()
    store = transport.durable
    fast, slow = Queue("evt", EVT.type_name, "fast"), Queue("evt", EVT.type_name, "slow")
    await store.prepare([fast, slow, CMD], lease=LEASE, dedup_window=60.0, retention=3600.0)
    for n in range(3000):
        await store.append("evt", EVT.type_name, envelope(f"e{n}"), dedup_id=f"e{n}")
    fast_reader = store.consumer(fast, consumer="n1", lease=LEASE)
    read = 0
    while deliveries := await fast_reader.fetch(500, 0):
        read += len(deliveries)
        for delivery in deliveries:
            await delivery.ack()
    assert read == 3000
    slow_reader = store.consumer(slow, consumer="n1", lease=LEASE)
    first = await slow_reader.fetch(5, 0)
    assert [delivery.envelope.headers["catga-id"] for delivery in first] == [f"e{n}" for n in range(5)]
    # Commands read leave the queue; a command group made later gets what is still queued, however
    # few were read (not only once they were trimmed from the list).
    for n in range(20):
        await store.append("cmd", CMD.type_name, envelope(f"c{n}"), dedup_id=f"c{n}")
    workers = store.consumer(CMD, consumer="n1", lease=LEASE)
    for delivery in await workers.fetch(15, 0):
        await delivery.ack()
    late = Queue("cmd", CMD.type_name, "late")
    await store.prepare([late], lease=LEASE, dedup_window=60.0, retention=3600.0)
    later = await store.consumer(late, consumer="n2", lease=LEASE).fetch(20, 0)
    assert [delivery.envelope.headers["catga-id"] for delivery in later] == [f"c{n}" for n in range(15, 20)]


async def test_events_and_dead_letters_older_than_the_retention_go_read_or_not() -> None:
    """As the brokers' max age drops them: a group that stopped reading does not keep every event
    for the life of the process, nor does a dead letter nobody looked at stay for ever."""
    now = [0.0]
    broker = InMemoryBroker(lambda: now[0])
    transport = InMemoryTransport(broker, cluster="aged")
    await transport.connect()
    store = transport.durable
    stopped = Queue("evt", EVT.type_name, "stopped")
    await store.prepare([EVT, stopped, CMD], lease=LEASE, dedup_window=60.0, retention=100.0)
    for n in range(3):
        await store.append("evt", EVT.type_name, envelope(f"old{n}"), dedup_id=f"old{n}")
        await store.append("cmd", CMD.type_name, envelope(f"cmd{n}"), dedup_id=f"cmd{n}")
    reading = store.consumer(EVT, consumer="n1", lease=LEASE)
    held = await reading.fetch(1, 0)  # taken, not settled when it expires
    assert [delivery.envelope.headers["catga-id"] for delivery in held] == ["old0"]
    letter = DeadLetter(
        id="workers:m1", queue_kind="cmd", message_type=CMD.type_name, message_id="m1", group="workers",
        reason="attempts", error_type="ValueError", error="boom", attempts=3, node_id="n1",
        at=datetime(2026, 1, 1, tzinfo=UTC),
    )  # fmt: skip
    await store.add_dead_letter(letter, envelope("m1"))

    now[0] = 99.0
    await store.append("evt", EVT.type_name, envelope("new"), dedup_id="new")
    assert [found.id for found, _ in await store.dead_letters(10)] == ["workers:m1"]
    now[0] = 101.0  # the first three events and the dead letter are past the retention
    await store.append("evt", EVT.type_name, envelope("newer"), dedup_id="newer")
    assert await store.dead_letters(10) == []
    assert await store.dead_letter("workers:m1") is None
    assert broker.durable.sizes()["entries"] == 5  # 3 commands (kept until run) and 2 events
    for queue, expected in ((EVT, ["new", "newer"]), (stopped, ["new", "newer"])):
        later = await store.consumer(queue, consumer="n2", lease=LEASE).fetch(10, 0)
        assert [delivery.envelope.headers["catga-id"] for delivery in later] == expected
    await held[0].ack()  # settling what is gone is no error
    commands = await store.consumer(CMD, consumer="n1", lease=LEASE).fetch(10, 0)
    assert [delivery.envelope.headers["catga-id"] for delivery in commands] == ["cmd0", "cmd1", "cmd2"]
