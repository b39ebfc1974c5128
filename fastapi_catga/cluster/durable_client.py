"""Durable delivery, the sending side: store a message on the broker, and wait for a command's outcome.

- ``send`` of a durable command stores it, then waits for its outcome until the deadline. There is
  no request-level retry or failover on top of the broker's redelivery. A timeout says the
  command was accepted and still runs (``details``: ``accepted``, ``message_id``); sending the
  same message id again is safe and returns the stored result once it is done.
- ``enqueue`` stores it and returns at once (an HTTP 202).
- ``publish`` of a durable event stores it and returns: each handler group runs it from the broker,
  this node's handlers too (never inline as well).

With an observer, each of them is a send (operation ``send``, ``enqueue`` or ``publish``) and the
stored envelope carries its trace context: the node that runs the message, maybe much later,
continues the trace (see `DurableRunner`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi_catga.cluster.durable_policy import COMMANDS, REPLAY_LEASE, replay_claim, result_subject
from fastapi_catga.core.envelope import (
    MESSAGE_ID,
    REPLAYS,
    REPLY_NODE,
    STATUS,
    Envelope,
    dead_letter_room,
    decode_reply,
    encode_message,
)
from fastapi_catga.core.messages import Accepted, Event, Message, Request, new_message_id
from fastapi_catga.core.observe import Observer
from fastapi_catga.exceptions import (
    BusyError,
    CatgaError,
    NodeUnavailableError,
    RequestTimeoutError,
    TransportError,
)
from fastapi_catga.transports.base import Delivery, Subscription, Transport, unsubscribe_all
from fastapi_catga.transports.durable import DeadLetter, DurableStore, Queue, QueueKind

__all__ = ["DeadLetters", "DurableClient", "PreparedStore", "is_durable"]

logger = logging.getLogger(__name__)

_DONE_POLL = 1.0  # s: how often a waiting send also reads the done record (an answer can be lost)
_REPLAY_WAIT = 5.0  # s a replay waits for another one of the same letter before it says "busy"
_T = TypeVar("_T")


class DurableClient:
    """Stores durable messages and waits for the outcome of durable commands.

    Args:
        transport: the connection; its ``durable`` store keeps the messages.
        node_id: this node (where outcomes are sent).
        clock: monotonic seconds.
        observer: told about each send, enqueue and publish; writes trace context into what is
            stored (None: nothing is called).
    """

    def __init__(
        self,
        transport: Transport,
        node_id: str,
        clock: Callable[[], float],
        *,
        observer: Observer | None = None,
        prepare: Callable[[], Awaitable[None]],
        budget: float = 30.0,
    ) -> None:
        self._transport = transport
        self._budget = budget  # seconds an enqueue or durable publish may wait for the broker
        self._node_id = node_id
        self._clock = clock
        self._observer = observer
        self._waiting: dict[str, list[asyncio.Future[Envelope]]] = {}  # message id -> its waiting sends
        self._subscription: Subscription | None = None
        self._store = PreparedStore(transport, prepare, budget)
        self.dead_letters = DeadLetters(self._store)
        #: Done records and leases for `IdempotencyBehavior`, made on the broker before first use.
        self.records = PreparedRecords(self._store)

    async def start(self) -> None:
        """Listen for the outcomes of the commands this node waits for."""
        self._subscription = await self._transport.subscribe(result_subject(self._node_id), self._on_result)

    async def stop(self) -> None:
        if self._subscription is not None:
            await unsubscribe_all([self._subscription])
        for message_id, futures in self._waiting.items():
            for future in futures:
                if not future.done():
                    future.set_exception(
                        NodeUnavailableError(
                            f"node {self._node_id} stopped while waiting; {message_id} was accepted "
                            "and still runs",
                            details={"accepted": True, "message_id": message_id},
                        )
                    )

    def _on_result(self, delivery: Delivery) -> None:
        for future in self._waiting.get(str(delivery.envelope.headers.get(MESSAGE_ID, "")), ()):
            if not future.done():
                future.set_result(delivery.envelope)

    async def _append(self, message: Message, *, wait: bool, dedup_id: str | None = None) -> Accepted:
        envelope = encode_message(  # with room for its dead letter: whatever happens, it fits there
            message,
            source=self._node_id,
            max_payload=self._transport.max_payload,
            reserve=dead_letter_room(message),
        )
        if wait:
            envelope.headers[REPLY_NODE] = self._node_id
        if self._observer is not None:
            self._observer.inject(envelope.headers)
        kind: QueueKind = "evt" if isinstance(message, Event) else "cmd"
        store = await self._store.ready()
        stored = await store.append(
            kind, message.type_name, envelope, dedup_id=dedup_id or message.message_id
        )
        return Accepted(message.message_id, stored.duplicate)

    async def _observed(self, message: Message, operation: str, work: Callable[[], Awaitable[_T]]) -> _T:
        if self._observer is None:
            return await work()
        token = self._observer.send_started(message, operation)
        started = time.perf_counter()
        try:
            done = await work()
        except BaseException as exc:
            self._observer.send_ended(token, message, operation, time.perf_counter() - started, exc)
            raise
        self._observer.send_ended(token, message, operation, time.perf_counter() - started, None)
        return done

    async def _store_once(self, message: Request[Any], key: str) -> bytes | None:
        """Store a command sent with a wait for its outcome; the stored outcome of an earlier run of
        its id, if that is done already."""
        if (await self._append(message, wait=True)).duplicate:
            done = await self._transport.durable.done(key)
            if done is not None:
                return done
            # The broker remembers this id, yet no outcome is on record: the first run's record
            # expired, or the first append still waits in the queue. Queue it again; if the
            # first is still there, whichever runs second finds the other's done record.
            await self._append(message, wait=True, dedup_id=f"{message.message_id}.{new_message_id()}")
        return None

    async def enqueue(self, message: Request[Any]) -> Accepted:
        """Store a durable command; return once the broker has it.

        Raises:
            TransportError: the broker did not confirm it within the node's request timeout, or
                failed; ``details["accepted"]`` is None: it may or may not be stored.
        """
        return await self._observed(message, "enqueue", lambda: self._stored(message))

    async def publish(self, event: Event) -> None:
        """Store a durable event; return once the broker has it (raises as `enqueue`)."""
        await self._observed(event, "publish", lambda: self._stored(event))

    async def _stored(self, message: Message) -> Accepted:
        """`_append` without a wait for the outcome, within the node's request timeout: a frozen
        broker (or one that keeps failing to make the streams) must not hold the caller."""
        unsure = {"accepted": None, "message_id": message.message_id}
        try:
            async with asyncio.timeout(self._budget):
                return await self._append(message, wait=False)
        except TimeoutError as exc:
            if isinstance(exc, CatgaError):  # a store's own RequestTimeoutError
                raise
            raise TransportError(
                f"{message.type_name} {message.message_id}: the broker did not confirm it within "
                f"{self._budget:g} s; it may or may not be stored (again with the same message_id "
                "stores it once)",
                details=unsure,
            ) from None
        except TransportError as exc:
            if exc.details is not None:
                raise
            # Its own, not the store's instance: one error may end several callers' calls.
            raise type(exc)(exc.message, node_id=exc.node_id, details=unsure) from exc

    async def send(self, message: Request[Any], budget: float) -> Any:
        """Store a durable command and wait up to ``budget`` seconds for its outcome.

        Raises:
            RequestTimeoutError: no outcome in time; ``details["accepted"]`` says it was stored
                and still runs.
            CatgaError: the error it was dead-lettered with.
        """
        return await self._observed(message, "send", lambda: self._send(message, budget))

    async def _send(self, message: Request[Any], budget: float) -> Any:
        deadline = self._clock() + budget
        key = f"{COMMANDS}:{message.message_id}"
        future: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(message.message_id, []).append(future)
        try:
            try:  # a frozen broker must not hold the caller past its deadline
                async with asyncio.timeout(budget):
                    done = await self._store_once(message, key)
            except TimeoutError:
                raise RequestTimeoutError(
                    f"{message.type_name} {message.message_id}: the broker did not confirm it within "
                    f"{budget:g} s; it may or may not be stored (send it again with the same message_id)",
                    details={"accepted": None, "message_id": message.message_id},
                ) from None
            if done is not None:  # a re-send of a finished command: its stored outcome
                return decode_reply(Envelope({STATUS: "ok"}, done), type(message).result_adapter())
            while True:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise RequestTimeoutError(
                        f"{message.type_name} {message.message_id} was accepted and still runs; no outcome "
                        f"within {budget:g} s (send it again with the same message_id for its result)",
                        details={"accepted": True, "message_id": message.message_id},
                    )
                try:
                    async with asyncio.timeout(min(remaining, _DONE_POLL)):
                        reply = await asyncio.shield(future)
                    break
                except TimeoutError:
                    try:  # within the deadline too: a frozen broker must not hold the caller
                        async with asyncio.timeout(max(0.0, deadline - self._clock())):
                            done = await self._transport.durable.done(key)
                    except TimeoutError:
                        continue  # the deadline came first: "accepted, and still runs"
                    if done is not None:
                        reply = Envelope({STATUS: "ok"}, done)
                        break
            return decode_reply(reply, type(message).result_adapter())
        finally:
            waiting = self._waiting[message.message_id]
            waiting.remove(future)
            if not waiting:
                del self._waiting[message.message_id]
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: a stop may have failed it after this send gave up


class PreparedStore:
    """A transport's durable store, with what messages and dead letters need made on the broker
    before the first use, where no durable worker of this node made it yet (a node that only
    enqueues, publishes or reads dead letters: JetStream has no stream until someone makes it).
    Made again after a reconnect: the broker may have come back without it.

    Args:
        prepare: makes it, with this node's own settings (`DurableRunner.prepare`: its types' own
            leases and windows, or the ``CATGA_DURABLE_*`` ones where it runs none).
        budget: seconds a caller waits for it to be made (its own attempt, or the one before it).
    """

    def __init__(
        self, transport: Transport, prepare: Callable[[], Awaitable[None]], budget: float = 30.0
    ) -> None:
        self._transport = transport
        self._prepare = prepare
        self._budget = budget
        self._made = False
        self._lock = asyncio.Lock()
        transport.add_connection_listener(self._on_connection)

    def _on_connection(self, connected: bool) -> None:
        if not connected:
            self._made = False

    @property
    def made(self) -> DurableStore | None:
        """The store if it is made already (the usual case: no wait, no coroutine), else None."""
        return self._transport.durable if self._made else None

    async def ready(self) -> DurableStore:
        """The store, made first if need be.

        Raises:
            TransportError: the broker did not make it within ``budget`` (frozen, or failing), or
                failed: callers queued on one another's attempts no longer wait for them all.
        """
        if not self._made:
            try:
                async with asyncio.timeout(self._budget):
                    async with self._lock:
                        if not self._made:
                            await self._prepare()
                            self._made = True
            except TimeoutError as exc:
                if isinstance(exc, CatgaError):
                    raise
                raise TransportError(
                    f"the broker did not make the durable streams within {self._budget:g} s"
                ) from None
        return self._transport.durable


class PreparedRecords:
    """The cluster's done records and leases (`IdempotencyBehavior`'s `DoneRecords`) on a
    `PreparedStore`: made on the broker before the first use, on a node with no durable type too
    (JetStream has no done-record bucket until someone makes it)."""

    def __init__(self, store: PreparedStore) -> None:
        self._store = store

    async def done(self, key: str) -> bytes | None:
        return await (self._store.made or await self._store.ready()).done(key)

    async def claim(self, key: str, holder: str, ttl: float) -> bool:
        return await (self._store.made or await self._store.ready()).claim(key, holder, ttl)

    async def take(self, key: str, holder: str, ttl: float) -> bytes | bool:
        return await (self._store.made or await self._store.ready()).take(key, holder, ttl)

    async def release(self, key: str, holder: str) -> None:
        await (self._store.made or await self._store.ready()).release(key, holder)

    async def commit(self, key: str, holder: str, result: bytes, ttl: float) -> bool:
        return await (self._store.made or await self._store.ready()).commit(key, holder, result, ttl)


class DeadLetters:
    """The dead-letter store: messages that will not run until replayed (``mediator.dead_letters``)."""

    def __init__(self, store: PreparedStore) -> None:
        self._store = store

    async def list(self, limit: int = 100) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, oldest first (none for a ``limit`` under 1)."""
        if limit < 1:
            return []
        return [letter for letter, _ in await (await self._store.ready()).dead_letters(limit)]

    async def get(self, letter_id: str) -> DeadLetter | None:
        """One dead letter by its id (``<group>:<message id>``), or None."""
        found = await (await self._store.ready()).dead_letter(letter_id)
        return None if found is None else found[0]

    async def replay(self, letter_id: str) -> bool:
        """Put the message back in its queue (same message id) and drop the dead letter; False when
        there is none. For an event, every handler group gets it again: those that ran it already
        skip it while their done record lasts."""
        store = await self._store.ready()
        seen = await store.dead_letter(letter_id)
        if seen is None:
            return False
        # One replay of the letter this caller saw, cluster-wide (Redis streams have no duplicate
        # window to fold two into one): a caller that finds it replayed meanwhile (gone, or back
        # with more replays) is answered that it was, and queues nothing more.
        key, holder = replay_claim(letter_id), new_message_id()
        deadline = asyncio.get_running_loop().time() + _REPLAY_WAIT
        while not await store.claim(key, holder, REPLAY_LEASE):
            if _replayed_since(seen[0], await store.dead_letter(letter_id)):
                return True
            if asyncio.get_running_loop().time() > deadline:
                raise BusyError(f"dead letter {letter_id} is being replayed by another caller; try again")
            await asyncio.sleep(0.05)
        try:
            found = await store.dead_letter(letter_id)
            if found is None or _replayed_since(seen[0], found):
                return True
            letter, envelope = found
            queue = Queue(letter.queue_kind, letter.message_type, letter.group)
            replays = letter.replays + 1
            # Counted on the message itself, so that its next dead letter counts on from there, and
            # its next replay gets a dedup id of its own: the broker's duplicate window must not
            # swallow it.
            replayed = Envelope({**envelope.headers, REPLAYS: str(replays)}, envelope.body)
            dedup_id = f"{letter.message_id}.replay{replays}"
            stored = await store.append(queue.kind, queue.type_name, replayed, dedup_id=dedup_id)
            if stored.duplicate:  # a replay whose removal failed, again: it is queued once
                logger.info("dead letter %s was replayed already (replay %d)", letter_id, replays)
            # Dropped only while the claim is still this replay's: past it (a broker stalled for
            # the whole lease), a node that failed the message again may have put its own letter
            # there, which is the message's only record now.
            if await store.renew(key, holder, REPLAY_LEASE) or not _replayed_since(
                letter, await store.dead_letter(letter_id)
            ):
                await store.remove_dead_letter(letter_id)
        finally:
            with contextlib.suppress(CatgaError):  # the lease ends by itself
                await store.release(key, holder)
        logger.info("dead letter %s replayed (replay %d)", letter_id, replays)
        return True

    async def discard(self, letter_id: str) -> bool:
        """Drop a dead letter for good; False when there is none."""
        return await (await self._store.ready()).remove_dead_letter(letter_id)


def _replayed_since(seen: DeadLetter, now: tuple[DeadLetter, Envelope] | None) -> bool:
    """Whether the letter a caller saw was replayed since: it is gone, or back after more replays."""
    return now is None or now[0].replays != seen.replays


def is_durable(message_type: type[Message]) -> bool:
    """Whether messages of this type travel the durable way."""
    return message_type.durable is not False
