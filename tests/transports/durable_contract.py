"""The durable seam's contract: every `DurableStore` (memory, NATS JetStream, Redis Streams) passes it.

A test module subclasses `DurableContract` and provides the ``make_store`` fixture: an async
factory of connected stores on one broker, each call a new connection (a new "node"), all on the
same cluster name. Timings are short (lease 1 s); waits poll with deadlines.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import pytest

from fastapi_catga.core.envelope import Envelope
from fastapi_catga.transports.durable import DeadLetter, DurableConsumer, DurableDelivery, DurableStore, Queue

MakeStore = Callable[[], Awaitable[DurableStore]]
LEASE = 1.0
CMD = Queue("cmd", "orders.Place", "workers")


def envelope(n: int) -> Envelope:
    return Envelope({"catga-id": f"m{n}", "catga-type": "orders.Place"}, f'{{"n": {n}}}'.encode())


async def prepared(make_store: MakeStore, *queues: Queue, dedup_window: float = 60) -> DurableStore:
    store = await make_store()
    await store.prepare(list(queues) or [CMD], lease=LEASE, dedup_window=dedup_window, retention=600)
    return store


async def fetch_all(consumer: DurableConsumer, want: int, within: float = 5.0) -> list[DurableDelivery]:
    """Fetch until ``want`` deliveries came, or fail after ``within`` seconds."""
    got: list[DurableDelivery] = []
    deadline = time.monotonic() + within
    while len(got) < want:
        assert time.monotonic() < deadline, f"{len(got)} of {want} deliveries within {within} s"
        got += await consumer.fetch(want - len(got), wait=0.2)
    return got


async def nothing_more(consumer: DurableConsumer, during: float = 0.6) -> None:
    """No delivery for ``during`` seconds (the one place a wait is the assertion)."""
    deadline = time.monotonic() + during
    while time.monotonic() < deadline:
        assert await consumer.fetch(10, wait=0.1) == []


class DurableContract:
    @pytest.fixture
    def make_store(self) -> MakeStore:
        raise NotImplementedError

    # -- queues ----------------------------------------------------------------------------------

    async def test_an_appended_command_is_delivered_once_and_gone_after_ack(
        self, make_store: MakeStore
    ) -> None:
        store = await prepared(make_store)
        assert (await store.append("cmd", CMD.type_name, envelope(1), dedup_id="m1")) is not None
        consumer = store.consumer(CMD, consumer="n1", lease=LEASE)
        (delivery,) = await fetch_all(consumer, 1)
        assert delivery.envelope.body == envelope(1).body
        assert delivery.envelope.headers["catga-id"] == "m1"
        assert delivery.deliveries == 1
        await delivery.ack()
        await nothing_more(consumer, during=LEASE + 0.5)  # not even after its lease
        await consumer.close()

    async def test_commands_queued_before_any_consumer_wait_for_one(self, make_store: MakeStore) -> None:
        store = await prepared(make_store)
        for n in range(5):
            await store.append("cmd", CMD.type_name, envelope(n), dedup_id=f"m{n}")
        consumer = store.consumer(CMD, consumer="late", lease=LEASE)
        got = await fetch_all(consumer, 5)
        assert sorted(d.envelope.headers["catga-id"] for d in got) == [f"m{n}" for n in range(5)]
        for delivery in got:
            await delivery.ack()
        await consumer.close()

    async def test_fetch_never_returns_more_than_asked(self, make_store: MakeStore) -> None:
        store = await prepared(make_store)
        for n in range(6):
            await store.append("cmd", CMD.type_name, envelope(n), dedup_id=f"m{n}")
        consumer = store.consumer(CMD, consumer="n1", lease=LEASE)
        first = await fetch_all(consumer, 2)
        assert len(first) == 2
        more = await consumer.fetch(2, wait=1.0)
        assert 1 <= len(more) <= 2
        for delivery in first + more:
            await delivery.ack()
        await consumer.close()

    async def test_consumers_of_one_group_share_the_work(self, make_store: MakeStore) -> None:
        a, b = await prepared(make_store), await prepared(make_store)
        for n in range(10):
            await a.append("cmd", CMD.type_name, envelope(n), dedup_id=f"m{n}")
        ca, cb = a.consumer(CMD, consumer="a", lease=LEASE), b.consumer(CMD, consumer="b", lease=LEASE)
        seen: list[str] = []
        deadline = time.monotonic() + 5
        while len(seen) < 10 and time.monotonic() < deadline:
            for consumer in (ca, cb):
                for delivery in await consumer.fetch(2, wait=0.1):
                    seen.append(delivery.envelope.headers["catga-id"])
                    await delivery.ack()
        assert sorted(seen) == sorted(f"m{n}" for n in range(10)), "each exactly once"
        await ca.close()
        await cb.close()

    async def test_each_event_group_gets_events_from_its_creation_on(self, make_store: MakeStore) -> None:
        first, second = Queue("evt", "orders.Placed", "mail"), Queue("evt", "orders.Placed", "stock")
        store = await prepared(make_store, first)
        await store.append("evt", "orders.Placed", envelope(1), dedup_id="e1")
        mail = store.consumer(first, consumer="n1", lease=LEASE)
        (e1,) = await fetch_all(mail, 1)
        assert e1.envelope.headers["catga-id"] == "m1"
        await e1.ack()
        await store.prepare([first, second], lease=LEASE, dedup_window=60, retention=600)
        stock = store.consumer(second, consumer="n1", lease=LEASE)
        await nothing_more(stock, during=0.3)  # e1 came before the stock group existed
        await store.append("evt", "orders.Placed", envelope(2), dedup_id="e2")
        for consumer in (mail, stock):
            got = await fetch_all(consumer, 1)
            assert [d.envelope.headers["catga-id"] for d in got] == ["m2"]
            await got[0].ack()
            await consumer.close()

    async def test_retry_delivers_again_after_the_delay_and_counts(self, make_store: MakeStore) -> None:
        store = await prepared(make_store)
        await store.append("cmd", CMD.type_name, envelope(1), dedup_id="m1")
        consumer = store.consumer(CMD, consumer="n1", lease=LEASE)
        (delivery,) = await fetch_all(consumer, 1)
        retried = time.monotonic()
        await delivery.retry(0.5)
        (again,) = await fetch_all(consumer, 1)
        assert time.monotonic() - retried >= 0.45
        assert again.deliveries == 2
        await again.ack()
        await consumer.close()

    async def test_a_delivery_nobody_acks_goes_to_another_consumer_after_its_lease(
        self, make_store: MakeStore
    ) -> None:
        a, b = await prepared(make_store), await prepared(make_store)
        await a.append("cmd", CMD.type_name, envelope(1), dedup_id="m1")
        dead = a.consumer(CMD, consumer="dead", lease=LEASE)
        (taken,) = await fetch_all(dead, 1)
        fetched = time.monotonic()
        heir = b.consumer(CMD, consumer="heir", lease=LEASE)
        (again,) = await fetch_all(heir, 1, within=LEASE + 5)
        assert time.monotonic() - fetched >= LEASE * 0.9
        assert again.deliveries == 2
        assert again.envelope.body == taken.envelope.body
        await again.ack()
        await heir.close()
        await dead.close()

    async def test_keep_alive_holds_a_long_run(self, make_store: MakeStore) -> None:
        a, b = await prepared(make_store), await prepared(make_store)
        await a.append("cmd", CMD.type_name, envelope(1), dedup_id="m1")
        runner, other = (
            a.consumer(CMD, consumer="runner", lease=LEASE),
            b.consumer(CMD, consumer="other", lease=LEASE),
        )
        (delivery,) = await fetch_all(runner, 1)
        deadline = time.monotonic() + 2.5 * LEASE
        while time.monotonic() < deadline:
            await delivery.keep_alive()
            assert await other.fetch(1, wait=LEASE / 4) == []
        await delivery.ack()
        await nothing_more(other, during=LEASE + 0.3)
        await runner.close()
        await other.close()

    async def test_drop_removes_without_a_redelivery(self, make_store: MakeStore) -> None:
        store = await prepared(make_store)
        await store.append("cmd", CMD.type_name, envelope(1), dedup_id="m1")
        consumer = store.consumer(CMD, consumer="n1", lease=LEASE)
        (delivery,) = await fetch_all(consumer, 1)
        await delivery.drop()
        await nothing_more(consumer, during=LEASE + 0.5)
        await consumer.close()

    async def test_a_repeated_append_is_stored_once_or_said_to_be_new(self, make_store: MakeStore) -> None:
        store = await prepared(make_store)
        first = await store.append("cmd", CMD.type_name, envelope(1), dedup_id="same")
        second = await store.append("cmd", CMD.type_name, envelope(1), dedup_id="same")
        assert first.duplicate is False
        consumer = store.consumer(CMD, consumer="n1", lease=LEASE)
        got = await fetch_all(consumer, 1 if second.duplicate else 2)
        for delivery in got:
            await delivery.ack()
        await nothing_more(consumer, during=0.3)
        await consumer.close()

    # -- leases and done records ---------------------------------------------------------------------

    async def test_one_holder_at_a_time_and_a_lost_lease_cannot_commit(self, make_store: MakeStore) -> None:
        a, b = await prepared(make_store), await prepared(make_store)
        assert await a.claim("workers:m1", "a", LEASE)
        assert not await b.claim("workers:m1", "b", LEASE)
        assert await a.renew("workers:m1", "a", LEASE)
        assert not await b.renew("workers:m1", "b", LEASE)
        await asyncio.sleep(LEASE + 1.2)  # a paused past its lease (per-key TTLs are whole seconds)
        assert await b.claim("workers:m1", "b", LEASE)
        assert not await a.renew("workers:m1", "a", LEASE)
        assert await b.commit("workers:m1", "b", b'"done by b"', 60)
        assert not await a.commit("workers:m1", "a", b'"done by a"', 60), "a's lease went to b"
        assert await a.done("workers:m1") == b'"done by b"'
        assert await b.done("workers:m2") is None

    async def test_release_lets_another_take_the_lease_and_commit_needs_one(
        self, make_store: MakeStore
    ) -> None:
        a, b = await prepared(make_store), await prepared(make_store)
        assert not await a.commit("workers:m3", "a", b"1", 60), "no lease, no commit"
        assert await a.claim("workers:m3", "a", 30)
        await b.release("workers:m3", "b")  # not b's: changes nothing
        assert not await b.claim("workers:m3", "b", 30)
        await a.release("workers:m3", "a")
        assert await b.claim("workers:m3", "b", 30)
        assert await b.commit("workers:m3", "b", b"2", 60)
        assert not await b.commit("workers:m3", "b", b"3", 60), "done once"
        assert await a.done("workers:m3") == b"2"

    async def test_take_answers_the_record_or_the_lease(self, make_store: MakeStore) -> None:
        a, b = await prepared(make_store), await prepared(make_store)
        assert await a.take("workers:t1", "a", 30) is True
        assert await b.take("workers:t1", "b", 30) is False, "a holds it, and nothing is done yet"
        assert await a.take("workers:t1", "a", 30) is True, "its holder may take it again"
        assert await a.commit("workers:t1", "a", b'"ran"', 60)
        assert await b.take("workers:t1", "b", 30) == b'"ran"'
        assert await b.claim("workers:t1", "c", 30), "answering the record took no lease"
        assert await b.take("workers:t1", "c", 30) == b'"ran"', "a record counts, whoever holds the lease"

    async def test_a_done_record_expires_after_its_window(self, make_store: MakeStore) -> None:
        store = await prepared(make_store, dedup_window=2)
        assert await store.claim("workers:m4", "a", 30)
        assert await store.commit("workers:m4", "a", b"r", 2)
        assert await store.done("workers:m4") == b"r"
        deadline = time.monotonic() + 6
        while await store.done("workers:m4") is not None:
            assert time.monotonic() < deadline, "the done record outlived its window"
            await asyncio.sleep(0.2)

    # -- dead letters -----------------------------------------------------------------------------

    async def test_every_dead_letter_id_is_its_own(self, make_store: MakeStore) -> None:
        """Ids that NATS's subjects once shared (48 characters and a 32-bit hash: these two, out of
        80,000 tried) are two letters, each found and discarded by its own id."""
        store = await prepared(make_store)
        ids = ["o" * 50 + "-47015", "o" * 50 + "-83757", "order:1", "order.1", "order=2E1"]
        for n, message_id in enumerate(ids):
            letter = DeadLetter(
                id=f"workers:{message_id}", queue_kind="cmd", message_type=CMD.type_name,
                message_id=message_id, group="workers", reason="rejected", error_type="Reject",
                error="no", attempts=1, node_id="n1", at=datetime(2026, 1, 1, tzinfo=UTC),
            )  # fmt: skip
            assert await store.add_dead_letter(letter, envelope(n)), message_id
        assert [letter.message_id for letter, _ in await store.dead_letters(10)] == ids
        for message_id in ids:
            found = await store.dead_letter(f"workers:{message_id}")
            assert found is not None and found[0].message_id == message_id
        assert await store.remove_dead_letter(f"workers:{ids[1]}")
        assert [letter.message_id for letter, _ in await store.dead_letters(10)] == [ids[0], *ids[2:]]

    async def test_dead_letters_are_kept_listed_and_discarded(self, make_store: MakeStore) -> None:
        store, other = await prepared(make_store), await prepared(make_store)
        letters = [
            DeadLetter(
                id=f"workers:m{n}",
                queue_kind="cmd",
                message_type=CMD.type_name,
                message_id=f"m{n}",
                group="workers",
                reason="attempts",
                error_type="ValueError",
                error="boom",
                attempts=3,
                node_id="n1",
                at=datetime(2026, 1, 1, tzinfo=UTC),
            )  # fmt: skip
            for n in range(3)
        ]
        for n, letter in enumerate(letters):
            assert await store.add_dead_letter(letter, envelope(n))
        assert not await store.add_dead_letter(letters[0], envelope(0))  # again: kept once
        listed = await other.dead_letters(10)
        assert [letter.id for letter, _ in listed] == [letter.id for letter in letters]
        found = await other.dead_letter("workers:m1")
        assert found is not None
        assert found[0] == letters[1]
        assert (found[1].headers, found[1].body) == (envelope(1).headers, envelope(1).body)
        assert await other.remove_dead_letter("workers:m1")
        assert not await other.remove_dead_letter("workers:m1")
        assert await store.dead_letter("workers:m1") is None
        assert [letter.id for letter, _ in await store.dead_letters(1)] == ["workers:m0"]
