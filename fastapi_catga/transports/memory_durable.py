"""The in-memory `DurableStore`: durable queues for nodes in one process (the embedded default, and
the test double of JetStream and Redis Streams).

It keeps the seam's rules (broker-counted deliveries, leases that run out, groups that start at
their creation for events, fenced done records, dead letters), not the data: nothing outlives the
process. One `MemoryDurable` per `InMemoryBroker`; each transport gets a view of it for its cluster.

Nothing grows with the messages that went through, as on the brokers: an entry every group of its
queue has read leaves the queue (as JetStream's work queue and Redis's acked commands do), and a
lease, done record or dedup id that ended is dropped by a sweep, once as many were written as were
kept after the last one and the earliest of them has ended. Durable events and dead letters older
than the retention go, read or not, as the brokers' max age drops them.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from fastapi_catga.core.envelope import Envelope
from fastapi_catga.transports.durable import DeadLetter, DurableDelivery, Queue, QueueKind, Stored

__all__ = ["MemoryDurable", "MemoryDurableStore"]


@dataclass(eq=False)
class _Entry:
    seq: int
    envelope: Envelope
    added: float  # the clock's time when it was stored


@dataclass(eq=False)
class _Pending:
    entry: _Entry
    deliveries: int
    available_at: float  # when it may go out again: its lease's end, or a retry's


@dataclass(eq=False)
class _Group:
    cursor: int  # the index, counted from the queue's first entry ever, of the next one to give it
    pending: dict[int, _Pending] = field(default_factory=dict)


@dataclass(eq=False)
class _Log:
    """One queue's entries, from the first one some group has not read yet."""

    entries: list[_Entry] = field(default_factory=list)
    base: int = 0  # how many entries every group had read and were dropped from the front
    groups: list[_Group] = field(default_factory=list)

    def unread(self) -> int:
        """The index of the first entry some group has not read (the base when no group reads)."""
        return min((group.cursor for group in self.groups), default=self.base)

    def trim(self) -> None:
        """Drop what every group has read once that is most of the list (a copy per halving)."""
        read = self.unread() - self.base
        if read >= 1024 and 2 * read >= len(self.entries):
            del self.entries[:read]
            self.base += read

    def expire(self, before: float) -> None:
        """Drop the entries stored before ``before``, read or not (what a group held of them too)."""
        old = 0
        while old < len(self.entries) and self.entries[old].added < before:
            old += 1
        if not old:
            return
        last = self.entries[old - 1].seq
        del self.entries[:old]
        self.base += old
        for group in self.groups:
            group.cursor = max(group.cursor, self.base)
            for seq in [seq for seq in group.pending if seq <= last]:
                del group.pending[seq]


class MemoryDurable:
    """The durable state of one `InMemoryBroker`: queues, groups, leases, done records, dead letters."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._seqs = itertools.count(1)
        self._queues: dict[tuple[str, QueueKind, str], _Log] = {}
        self._groups: dict[tuple[str, Queue], _Group] = {}
        self._dedup: dict[tuple[str, str], float] = {}  # dedup id: until when
        self._leases: dict[tuple[str, str], tuple[str, float]] = {}
        self._done: dict[tuple[str, str], tuple[bytes, float]] = {}
        self._writes = 0  # to those three since the last sweep
        self._sweep_after = 1024
        self._soonest = math.inf  # the earliest end of those kept or written since the last sweep
        self._letters: dict[str, dict[str, tuple[DeadLetter, Envelope, float]]] = {}  # until when
        self._retention: dict[str, float] = {}
        self.changed = asyncio.Event()

    def _wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def log(self, cluster: str, kind: QueueKind, type_name: str) -> _Log:
        log = self._queues.get((cluster, kind, type_name))
        if log is None:
            log = self._queues[(cluster, kind, type_name)] = _Log()
        return log

    def group(self, cluster: str, queue: Queue) -> _Group:
        state = self._groups.get((cluster, queue))
        if state is None:
            log = self.log(cluster, queue.kind, queue.type_name)
            # Commands: what no group has read yet (what the brokers still hold); events: from now on.
            state = _Group(log.unread() if queue.kind == "cmd" else log.base + len(log.entries))
            self._groups[(cluster, queue)] = state
            log.groups.append(state)
        return state

    def append(
        self, cluster: str, kind: QueueKind, type_name: str, envelope: Envelope, dedup_id: str, window: float
    ) -> Stored:
        now = self.clock()
        key = (cluster, dedup_id)
        if self._dedup.get(key, -1.0) > now:
            return Stored(duplicate=True)
        self._dedup[key] = now + window
        self._wrote(now + window)
        log = self.log(cluster, kind, type_name)
        log.entries.append(_Entry(next(self._seqs), envelope, now))
        if kind == "evt":
            log.expire(now - self.retention(cluster))
        self._wake()
        return Stored()

    def take(self, cluster: str, queue: Queue, limit: int, lease: float) -> list[_Pending]:
        """Up to ``limit`` entries for the group: those whose lease or retry delay ran out, then new ones."""
        now, state = self.clock(), self.group(cluster, queue)
        taken = [p for p in state.pending.values() if p.available_at <= now][:limit]
        log = self.log(cluster, queue.kind, queue.type_name)
        entries, base = log.entries, log.base
        while len(taken) < limit and state.cursor - base < len(entries):
            entry = entries[state.cursor - base]
            state.cursor += 1
            taken.append(state.pending.setdefault(entry.seq, _Pending(entry, 0, now)))
        log.trim()  # what is taken and not settled stays in the group's pending
        for pending in taken:
            pending.deliveries += 1
            pending.available_at = now + lease
        return taken

    def settle(self, cluster: str, queue: Queue, seq: int, available_at: float | None) -> None:
        """Ack or drop (``available_at`` None), or hand back until ``available_at``."""
        state = self.group(cluster, queue)
        pending = state.pending.get(seq)
        if pending is None:
            return
        if available_at is None:
            del state.pending[seq]
        else:
            pending.available_at = available_at
        self._wake()

    def next_due(self, cluster: str, queue: Queue) -> float | None:
        times = [p.available_at for p in self.group(cluster, queue).pending.values()]
        return min(times) if times else None

    # -- leases and done records ---------------------------------------------------------------------

    def holder(self, cluster: str, key: str) -> str | None:
        lease = self._leases.get((cluster, key))
        return lease[0] if lease is not None and lease[1] > self.clock() else None

    def set_lease(self, cluster: str, key: str, holder: str | None, ttl: float) -> None:
        if holder is None:
            self._leases.pop((cluster, key), None)
        else:
            until = self.clock() + ttl
            self._leases[(cluster, key)] = (holder, until)
            self._wrote(until)

    def done(self, cluster: str, key: str) -> bytes | None:
        record = self._done.get((cluster, key))
        return record[0] if record is not None and record[1] > self.clock() else None

    def take_lease(self, cluster: str, key: str, holder: str, ttl: float) -> bytes | bool:
        """`DurableStore.take`, in one step."""
        name, now = (cluster, key), self.clock()
        record = self._done.get(name)
        if record is not None and record[1] > now:
            return record[0]
        lease = self._leases.get(name)
        if lease is not None and lease[0] != holder and lease[1] > now:
            return False
        self._leases[name] = (holder, now + ttl)
        self._wrote(now + ttl)
        return True

    def commit(self, cluster: str, key: str, holder: str, result: bytes, ttl: float) -> bool:
        """`DurableStore.commit`, in one step."""
        name, now = (cluster, key), self.clock()
        lease, record = self._leases.get(name), self._done.get(name)
        if lease is None or lease[0] != holder or lease[1] <= now or (record is not None and record[1] > now):
            return False
        self._done[name] = (result, now + ttl)
        del self._leases[name]
        self._wrote(now + ttl)
        return True

    def _wrote(self, until: float) -> None:
        """Counts a write of a dedup id, lease or done record that ends at ``until``; once there were
        as many as those kept after the last sweep, and one of them may have ended, drops the ended
        ones (O(1) a write, about twice the live ones kept; no sweep while none can have ended)."""
        self._writes += 1
        if until < self._soonest:
            self._soonest = until
        if self._writes >= self._sweep_after and self.clock() >= self._soonest:
            now = self.clock()
            self._dedup = {key: end for key, end in self._dedup.items() if end > now}
            self._leases = {key: lease for key, lease in self._leases.items() if lease[1] > now}
            self._done = {key: record for key, record in self._done.items() if record[1] > now}
            self._soonest = min(
                min(self._dedup.values(), default=math.inf),
                min((lease[1] for lease in self._leases.values()), default=math.inf),
                min((record[1] for record in self._done.values()), default=math.inf),
            )
            self._writes = 0
            self._sweep_after = max(1024, len(self._dedup) + len(self._leases) + len(self._done))

    def sizes(self) -> dict[str, int]:
        """How many entries, leases, done records and dedup ids are kept (for tests of growth)."""
        return {
            "entries": sum(len(log.entries) for log in self._queues.values()),
            "leases": len(self._leases),
            "done": len(self._done),
            "dedup": len(self._dedup),
        }

    def retention(self, cluster: str) -> float:
        """How long the cluster's durable events and dead letters are kept (`CATGA_DURABLE_RETENTION`)."""
        return self._retention.get(cluster, 14 * 86400.0)

    def retain(self, cluster: str, seconds: float) -> None:
        self._retention[cluster] = seconds

    def add_letter(self, cluster: str, letter: DeadLetter, envelope: Envelope) -> bool:
        letters = self.letters(cluster)
        if letter.id in letters:
            return False
        letters[letter.id] = (letter, envelope, self.clock() + self.retention(cluster))
        return True

    def letters(self, cluster: str) -> dict[str, tuple[DeadLetter, Envelope, float]]:
        """The cluster's dead letters, oldest first, past their retention dropped."""
        letters, now = self._letters.setdefault(cluster, {}), self.clock()
        while letters:
            oldest = next(iter(letters))
            if letters[oldest][2] > now:
                break
            del letters[oldest]
        return letters


@dataclass(eq=False)
class _Delivery:
    store: MemoryDurableStore
    queue: Queue
    seq: int
    envelope: Envelope
    deliveries: int
    lease: float

    async def ack(self) -> None:
        await self.store._settle(self.queue, self.seq, None)

    async def drop(self) -> None:
        await self.store._settle(self.queue, self.seq, None)

    async def retry(self, delay: float) -> None:
        await self.store._settle(self.queue, self.seq, self.store._state.clock() + max(0.0, delay))

    async def keep_alive(self) -> None:
        await self.store._settle(self.queue, self.seq, self.store._state.clock() + self.lease)


class _Consumer:
    def __init__(self, store: MemoryDurableStore, queue: Queue, lease: float) -> None:
        self._store = store
        self._queue = queue
        self._lease = lease
        self._closed = False

    async def fetch(self, limit: int, wait: float) -> list[DurableDelivery]:
        state, store = self._store._state, self._store
        deadline = state.clock() + wait
        while not self._closed:
            await store._reachable()
            taken = state.take(store.cluster, self._queue, limit, self._lease)
            if taken:
                return [
                    _Delivery(
                        store, self._queue, p.entry.seq, _copy(p.entry.envelope), p.deliveries, self._lease
                    )
                    for p in taken
                ]
            now = state.clock()
            if now >= deadline:
                break
            due = state.next_due(store.cluster, self._queue)
            until = min(deadline, due) if due is not None and due > now else deadline
            try:
                async with asyncio.timeout(max(0.001, until - now)):
                    await state.changed.wait()
            except TimeoutError:
                pass
        return []

    async def close(self) -> None:
        self._closed = True


class MemoryDurableStore:
    """One transport's `DurableStore` on the shared `MemoryDurable`, namespaced by cluster.

    Args:
        state: the broker's durable state.
        cluster: the namespace.
        reachable: waits while the broker is frozen, raises `TransportError` while it is down.
    """

    def __init__(self, state: MemoryDurable, cluster: str, reachable: Callable[[], Awaitable[None]]) -> None:
        self._state = state
        self.cluster = cluster
        self._reachable = reachable
        self._window = 120.0

    async def prepare(
        self, queues: Sequence[Queue], *, lease: float, dedup_window: float, retention: float
    ) -> None:
        await self._reachable()
        self._window = min(dedup_window, 120.0)  # as JetStream's default duplicate window
        self._state.retain(self.cluster, retention)
        for queue in queues:
            self._state.group(self.cluster, queue)

    async def append(self, kind: QueueKind, type_name: str, envelope: Envelope, *, dedup_id: str) -> Stored:
        await self._reachable()
        return self._state.append(self.cluster, kind, type_name, _copy(envelope), dedup_id, self._window)

    def consumer(self, queue: Queue, *, consumer: str, lease: float) -> _Consumer:
        return _Consumer(self, queue, lease)

    async def _settle(self, queue: Queue, seq: int, available_at: float | None) -> None:
        await self._reachable()
        self._state.settle(self.cluster, queue, seq, available_at)

    async def done(self, key: str) -> bytes | None:
        await self._reachable()
        return self._state.done(self.cluster, key)

    async def claim(self, key: str, holder: str, ttl: float) -> bool:
        await self._reachable()
        if self._state.holder(self.cluster, key) not in (None, holder):
            return False
        self._state.set_lease(self.cluster, key, holder, ttl)
        return True

    async def take(self, key: str, holder: str, ttl: float) -> bytes | bool:
        await self._reachable()
        return self._state.take_lease(self.cluster, key, holder, ttl)

    async def renew(self, key: str, holder: str, ttl: float) -> bool:
        await self._reachable()
        if self._state.holder(self.cluster, key) != holder:
            return False
        self._state.set_lease(self.cluster, key, holder, ttl)
        return True

    async def release(self, key: str, holder: str) -> None:
        await self._reachable()
        if self._state.holder(self.cluster, key) == holder:
            self._state.set_lease(self.cluster, key, None, 0)

    async def commit(self, key: str, holder: str, result: bytes, ttl: float) -> bool:
        await self._reachable()
        return self._state.commit(self.cluster, key, holder, result, ttl)

    async def add_dead_letter(self, letter: DeadLetter, envelope: Envelope) -> bool:
        await self._reachable()
        return self._state.add_letter(self.cluster, letter, _copy(envelope))

    async def dead_letters(self, limit: int) -> list[tuple[DeadLetter, Envelope]]:
        await self._reachable()
        kept = itertools.islice(self._state.letters(self.cluster).values(), limit)
        return [(letter, envelope) for letter, envelope, _ in kept]

    async def dead_letter(self, letter_id: str) -> tuple[DeadLetter, Envelope] | None:
        await self._reachable()
        kept = self._state.letters(self.cluster).get(letter_id)
        return None if kept is None else kept[:2]

    async def remove_dead_letter(self, letter_id: str) -> bool:
        await self._reachable()
        return self._state.letters(self.cluster).pop(letter_id, None) is not None


def _copy(envelope: Envelope) -> Envelope:
    return Envelope(dict(envelope.headers), envelope.body)
