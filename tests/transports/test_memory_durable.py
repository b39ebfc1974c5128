"""The in-memory durable store passes the durable contract."""

from __future__ import annotations

import pytest

from fastapi_catga.core.envelope import Envelope
from fastapi_catga.testing import InMemoryBroker, InMemoryTransport
from fastapi_catga.transports.durable import DurableStore, Queue
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
