"""The durable seam: at-least-once queues, leases, done records and dead letters, kept by the broker.

A broker offers these mechanics; what to do with them (when to run a handler, retry, dead-letter,
answer a waiting caller) is written once, in ``cluster/durable.py``:

- a **queue** per (kind, message type): ``cmd`` queues hold commands, ``evt`` queues events. A
  queue is read by consumer **groups**: each message is delivered to one consumer of every group
  (commands have one group, ``workers``; an event has a group per handler). A message is delivered
  again (to any consumer of the group) until it is acknowledged: after `DurableDelivery.retry`, or
  when its lease runs out (the consumer died, or stopped answering). The broker counts deliveries;
  nobody counts them in process memory.
- **leases and done records** by key (``<group>:<message id>``): a lease says which node runs a
  message now; the done record, written only while holding the lease, says it succeeded and
  holds the encoded result, for ``dedup_window`` seconds.
- **dead letters**: a message that will not run (too many attempts, rejected, undecodable), its
  original bytes kept with why, until replayed or discarded.

Every name a broker builds from a type name or group must be made safe for that broker (type
names may contain dots).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fastapi_catga.core.dead_letter import DeadLetter, QueueKind
from fastapi_catga.core.envelope import Envelope

__all__ = [
    "DeadLetter",
    "DurableConsumer",
    "DurableDelivery",
    "DurableStore",
    "Queue",
    "QueueKind",
    "Stored",
]


@dataclass(frozen=True, slots=True)
class Queue:
    """Where a durable message waits: its kind and type, read by one consumer group."""

    kind: QueueKind
    type_name: str
    group: str


@dataclass(frozen=True, slots=True)
class Stored:
    """The broker's receipt for an appended message."""

    #: The broker already held a message with this dedup id (within its window): not stored twice.
    duplicate: bool = False


class DurableDelivery(Protocol):
    """One delivery of a durable message to this consumer."""

    envelope: Envelope
    #: How often the broker has delivered this message to the group, this delivery included.
    deliveries: int

    async def ack(self) -> None:
        """Done: the message leaves the queue for this group."""
        ...

    async def retry(self, delay: float) -> None:
        """Hand it back; deliver it again (to any consumer) no sooner than ``delay`` seconds from now."""
        ...

    async def keep_alive(self) -> None:
        """Its handler still runs here: extend this delivery's lease, so nobody else gets it."""
        ...

    async def drop(self) -> None:
        """Remove it from the queue without an ack of success (after it was dead-lettered)."""
        ...


class DurableConsumer(Protocol):
    """One node's reader of one queue for one group."""

    async def fetch(self, limit: int, wait: float) -> list[DurableDelivery]:
        """Up to ``limit`` deliveries: new ones, and those whose lease ran out; waits up to ``wait`` s
        for the first. Never more than ``limit``: a delivery's lease starts when it is fetched.

        Raises:
            TransportError: the broker is unreachable (the caller backs off and fetches again).
        """
        ...

    async def close(self) -> None:
        """Stop reading; deliveries fetched but not acked go back to the queue after their lease."""
        ...


class DurableStore(Protocol):
    """The durable mechanics of one broker connection (``transport.durable``)."""

    async def prepare(
        self, queues: Sequence[Queue], *, lease: float, dedup_window: float, retention: float
    ) -> None:
        """Create what the queues, groups, done records and dead letters need; idempotent, and called
        again after a reconnect. A new ``evt`` group starts with the events published from now on; a
        new ``cmd`` group starts with everything already queued."""
        ...

    async def append(self, kind: QueueKind, type_name: str, envelope: Envelope, *, dedup_id: str) -> Stored:
        """Store a message in its queue; return once the broker has it.

        ``dedup_id`` lets the broker drop a repeat of the same append (a retried publish) where it can.

        Raises:
            TransportError: the broker did not confirm it: it may or may not be stored.
            MessageTooLargeError: over the broker's limit; nothing stored.
        """
        ...

    def consumer(self, queue: Queue, *, consumer: str, lease: float) -> DurableConsumer:
        """A reader of ``queue`` named ``consumer`` (this node); a delivery not acked, retried or kept
        alive within ``lease`` seconds goes to another consumer of the group."""
        ...

    async def done(self, key: str) -> bytes | None:
        """The done record under ``key`` (the encoded result), or None."""
        ...

    async def claim(self, key: str, holder: str, ttl: float) -> bool:
        """Take the lease on ``key`` for ``ttl`` seconds; False while another holder has it."""
        ...

    async def take(self, key: str, holder: str, ttl: float) -> bytes | bool:
        """The done record under ``key`` if there is one (no lease taken); else `claim`'s answer.

        What a run asks before it starts, in one step where the broker allows (it is `claim`, then
        `done` once the lease is held: a commit writes the record before it lets the lease go, so
        a run that ended just before the claim is seen, never run a second time)."""
        ...

    async def renew(self, key: str, holder: str, ttl: float) -> bool:
        """Extend ``holder``'s lease; False when it is no longer ``holder``'s."""
        ...

    async def release(self, key: str, holder: str) -> None:
        """Give the lease up, if ``holder`` has it."""
        ...

    async def commit(self, key: str, holder: str, result: bytes, ttl: float) -> bool:
        """Write the done record (kept ``ttl`` seconds) if and only if ``holder`` still has the lease
        and no done record exists; release the lease. False: the work was not ``holder``'s to commit
        (a paused node resuming after its lease went to another)."""
        ...

    async def add_dead_letter(self, letter: DeadLetter, envelope: Envelope) -> bool:
        """Keep a dead letter; adding one with an id already kept changes nothing and returns False."""
        ...

    async def dead_letters(self, limit: int) -> list[tuple[DeadLetter, Envelope]]:
        """Up to ``limit`` dead letters, oldest first."""
        ...

    async def dead_letter(self, letter_id: str) -> tuple[DeadLetter, Envelope] | None:
        """One dead letter by id, or None."""
        ...

    async def remove_dead_letter(self, letter_id: str) -> bool:
        """Discard a dead letter; False when there was none."""
        ...
