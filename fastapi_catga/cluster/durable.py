"""Durable delivery, the consuming side: run each stored message's handler until one run succeeds.

For every durable command type this node handles, and every handler of a durable event type, a
worker fetches from its broker queue (no more than it has free slots: a delivery's lease starts
when it is fetched) and, for each delivery:

1. a done record for (group, message id) exists: the work was done; ack (and answer a caller);
2. the broker delivered it more than ``attempts`` times (runs that failed, or crashed their node):
   dead-letter it without running it;
3. take the lease on (group, message id); another live holder has it: hand the delivery back;
4. run the handler, renewing the lease (and the broker's) every third of it;
5. success: write the done record with the result, fenced by the lease (a node that resumes after
   its lease went elsewhere cannot commit), then ack; a waiting caller gets the result;
6. `RetryLater`: hand it back after its delay; `Reject`, an invalid message, or a failure on the
   last attempt: dead-letter it (original bytes, reason, error, attempts, node, time); any other
   failure: hand it back after the backoff.

An observer is told of each run of step 4 with the stored headers: the trace context its sender
wrote there makes the run's ``process`` span a child of the send, wherever and whenever it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi_catga.cluster.durable_policy import (
    COMMANDS,
    REPLAY_LEASE,
    DurablePolicy,
    dead_letter_for,
    event_runner,
    message_id_of,
    observed_run,
    policy_for,
    replay_claim,
    result_encoder,
    result_subject,
)
from fastapi_catga.core.dispatch import LocalDispatcher
from fastapi_catga.core.envelope import (
    MESSAGE_ID,
    NODE,
    REPLY_NODE,
    STATUS,
    Envelope,
    decode_message,
    encode_error,
    retry_delay,
)
from fastapi_catga.core.logs import LogLimiter
from fastapi_catga.core.messages import Message, Request, new_message_id
from fastapi_catga.core.observe import Observer
from fastapi_catga.core.raised import owned_run
from fastapi_catga.core.tasks import cancel_and_wait
from fastapi_catga.core.travels import result_not_json
from fastapi_catga.exceptions import (
    CatgaError,
    MessageTooLargeError,
    MessageValidationError,
    Reject,
    RetryLater,
    TransportError,
)
from fastapi_catga.settings import CatgaSettings
from fastapi_catga.transports.base import Transport
from fastapi_catga.transports.durable import DeadLetter, DurableDelivery, DurableStore, Queue

__all__ = ["DurableRunner"]

logger = logging.getLogger(__name__)

#: Seconds between two looks at the claim of the replay that queued a message that failed again
#: before the replay dropped the old letter (it does within milliseconds; its claim lapses by itself).
_REPLAYING_WAIT = 0.1


@dataclass(frozen=True, slots=True)
class _Work:
    queue: Queue
    policy: DurablePolicy
    run: Callable[[Message], Awaitable[Any]]
    encode: Callable[[Message, Any], bytes]


class DurableRunner:
    """Runs this node's durable handlers from their broker queues.

    Args:
        transport: the connection; its ``durable`` store holds the queues.
        dispatcher: this node's handlers.
        settings: node id, durable defaults (retention, concurrency).
    """

    def __init__(
        self,
        transport: Transport,
        dispatcher: LocalDispatcher,
        settings: CatgaSettings,
        *,
        observer: Observer | None = None,
    ) -> None:
        self._transport = transport
        self._observer = observer
        self._dispatcher = dispatcher
        self._settings = settings
        self._works = list(self._plan())
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False  # a fetch that outlived its cancellation ends at its next turn
        self._running: set[asyncio.Task[None]] = set()
        self._log_limit = LogLimiter()

    @property
    def store(self) -> DurableStore:
        return self._transport.durable

    @property
    def queues(self) -> list[Queue]:
        return [work.queue for work in self._works]

    def _plan(self) -> list[_Work]:
        works: list[_Work] = []
        encode = result_encoder(self._settings.node_id, self._transport.max_payload)
        for message_type in self._dispatcher.requests:
            policy = policy_for(message_type, self._settings)
            if policy is not None:
                queue = Queue("cmd", message_type.type_name, COMMANDS)
                works.append(_Work(queue, policy, self._run_request, encode))
        for message_type, handlers in self._dispatcher.event_pipelines().items():
            policy = policy_for(message_type, self._settings)
            if policy is None:
                continue
            for name, event_pipeline in handlers:
                queue = Queue("evt", message_type.type_name, name)
                run = event_runner(self._dispatcher, event_pipeline)
                works.append(_Work(queue, policy, run, lambda _m, _r: b"null"))
        return works

    async def _run_request(self, message: Message) -> Any:
        assert isinstance(message, Request)
        return await self._dispatcher.handle_request(message)

    async def start(self) -> None:
        """Create the queues this node reads and start a worker per queue."""
        if not self._works:
            return
        await self.prepare()
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._work(work), name=f"catga-durable-{work.queue.type_name}")
            for work in self._works
        ]

    async def prepare(self) -> None:
        """Create (again, after a reconnect) what the queues need on the broker: each queue with its
        type's own lease (a JetStream consumer's ack wait), the stores with the longest window."""
        by_lease: dict[float, list[Queue]] = {}
        for work in self._works:
            by_lease.setdefault(work.policy.lease, []).append(work.queue)
        windows = [work.policy.dedup_window for work in self._works] or [self._settings.durable_dedup_window]
        for lease, queues in by_lease.items() or [(self._settings.durable_lease, [])]:
            await self.store.prepare(
                queues, lease=lease, dedup_window=max(windows), retention=self._settings.durable_retention
            )

    async def stop(self, drain_timeout: float) -> None:
        """Stop fetching; let runs in flight finish (their deliveries come back after the lease if not).

        A fetch or a run that ignores its cancellation is left behind after `CANCEL_GRACE` and named
        in the log: a stop never waits on a broker call that hangs, or on a handler that will not end.
        """
        self._stopping = True
        await cancel_and_wait(self._tasks, what="durable fetch", logger=logger)
        if self._running:
            _, pending = await asyncio.wait(set(self._running), timeout=drain_timeout)
            await cancel_and_wait(pending, what="durable run", logger=logger)

    async def _work(self, work: _Work) -> None:
        consumer = self.store.consumer(work.queue, consumer=self._settings.node_id, lease=work.policy.lease)
        slots = asyncio.Semaphore(self._settings.durable_concurrency)
        delay = 0.05
        try:
            while not self._stopping:
                await slots.acquire()
                free = 1
                while not slots.locked() and free < self._settings.durable_concurrency:
                    await slots.acquire()
                    free += 1
                try:
                    deliveries = await consumer.fetch(free, wait=1.0)
                    delay = 0.05
                except Exception as exc:  # the worker outlives anything: back off and fetch again
                    if self._stopping:  # a client that turned the stop's cancellation into its error
                        break
                    deliveries = []
                    unexpected = not isinstance(exc, TransportError | TimeoutError)
                    self._log_limit.log(
                        logger, logging.ERROR if unexpected else logging.WARNING, "fetch",
                        "durable %s: fetching failed (%s); again in %.2f s", work.queue.type_name,
                        exc or type(exc).__name__, delay, exc_info=exc if unexpected else None,
                    )  # fmt: skip
                    await asyncio.sleep(delay)
                    delay = min(5.0, delay * 2)
                if self._stopping:  # fetched as the node stops: the lease brings them back elsewhere
                    deliveries = []
                for _ in range(free - len(deliveries)):
                    slots.release()
                for delivery in deliveries:
                    task = asyncio.get_running_loop().create_task(
                        self._process(work, delivery), name=f"catga-durable-run-{work.queue.type_name}"
                    )
                    self._running.add(task)
                    task.add_done_callback(self._running.discard)
                    task.add_done_callback(lambda _t: slots.release())
        finally:
            with contextlib.suppress(Exception):
                await consumer.close()

    async def _process(self, work: _Work, delivery: DurableDelivery) -> None:
        owned_run()
        try:
            await self._handle(work, delivery)
        except (TransportError, TimeoutError) as exc:  # the broker failed us midway: the lease brings it back
            self._warn(
                "process",
                "durable %s: the broker failed while handling a delivery (%s)",
                work.queue.type_name,
                exc,
            )
        except Exception:
            logger.exception("durable %s: unexpected failure handling a delivery", work.queue.type_name)

    async def _handle(self, work: _Work, delivery: DurableDelivery) -> None:
        envelope = delivery.envelope
        try:
            message = decode_message(envelope, self._dispatcher.types)
            if message.type_name != work.queue.type_name:
                raise MessageValidationError(f"a {message.type_name} in the {work.queue.type_name} queue")
        except CatgaError as exc:
            await self._dead_letter(work, delivery, "invalid", exc, message_id_of(envelope))
            return
        key = f"{work.queue.group}:{message.message_id}"
        # The holder is this run, not this node: a second delivery of the same id on this node (a
        # re-send, a redelivery while the first run lives) must wait for the first like anyone else.
        holder, lease = f"{self._settings.node_id}/{os.urandom(6).hex()}", work.policy.lease
        while (taken := await self.store.take(key, holder, lease)) is False:
            # Another node runs this message id now (a second copy of it, or a redelivery while its
            # holder lives). Hold this delivery, without counting an attempt, until that run commits
            # (then this copy is done) or its lease lapses (then it is ours).
            await delivery.keep_alive()
            await asyncio.sleep(min(1.0, lease / 3))
        if taken is not True:  # a run of this message id succeeded already: answer with its result
            await self._done_already(envelope, delivery, taken)
            return
        if delivery.deliveries > work.policy.attempts:  # its earlier runs crashed their nodes
            await self.store.release(key, holder)
            error = CatgaError(
                f"delivered {delivery.deliveries} times without a success (its nodes crashed?)"
            )
            await self._dead_letter(work, delivery, "attempts", error, message.message_id)
            return
        keeper = asyncio.get_running_loop().create_task(self._keep(key, holder, delivery, lease))
        try:
            encoded = await observed_run(self._observer, message, envelope.headers, work.run, work.encode)
        except CatgaError as exc:
            keeper.cancel()
            await self._failed(work, delivery, key, holder, message, exc)
            return
        except Exception as exc:  # validated, yet not JSON (an `Any` result holding some object)
            keeper.cancel()
            error = result_not_json(message, self._settings.node_id, exc)
            await self.store.release(key, holder)
            await self._dead_letter(work, delivery, "invalid", error, message.message_id)
            return
        finally:
            keeper.cancel()
        if await self.store.commit(key, holder, encoded, work.policy.dedup_window):
            await delivery.ack()
            await self._answer(envelope, Envelope({STATUS: "ok", NODE: self._settings.node_id}, encoded))
        elif await self.store.done(key) is not None:
            await delivery.ack()  # another node finished it first (this one was paused): keep its result
        else:
            self._warn(
                "fence",
                "durable %s %s: lost the lease while running; not committed",
                message.type_name,
                message.message_id,
            )

    async def _done_already(self, envelope: Envelope, delivery: DurableDelivery, done: bytes) -> None:
        """A run of this message id succeeded already (a redelivery, a re-send of the same id): this
        delivery is acked and its caller answered with that run's result."""
        await delivery.ack()
        await self._answer(envelope, Envelope({STATUS: "ok", NODE: self._settings.node_id}, done))

    async def _keep(self, key: str, holder: str, delivery: DurableDelivery, lease: float) -> None:
        while True:
            await asyncio.sleep(lease / 3)
            with contextlib.suppress(TransportError, TimeoutError):
                await self.store.renew(key, holder, lease)
                await delivery.keep_alive()

    async def _failed(
        self, work: _Work, delivery: DurableDelivery, key: str, holder: str, message: Message, exc: CatgaError
    ) -> None:
        await self.store.release(key, holder)
        if isinstance(exc, Reject):
            await self._dead_letter(work, delivery, "rejected", exc, message.message_id)
        elif isinstance(exc, MessageValidationError | MessageTooLargeError):  # so on every run
            await self._dead_letter(work, delivery, "invalid", exc, message.message_id)
        elif delivery.deliveries >= work.policy.attempts:
            await self._dead_letter(work, delivery, "attempts", exc, message.message_id)
        else:
            delay = (
                retry_delay(exc) if isinstance(exc, RetryLater) else work.policy.delay(delivery.deliveries)
            )
            self._warn(
                f"retry:{work.queue}", "durable %s %s failed on delivery %d (%s); again in %.2f s",
                message.type_name, message.message_id, delivery.deliveries, type(exc).__name__, delay,
            )  # fmt: skip
            await delivery.retry(delay)
            if self._observer is not None:
                self._observer.redelivered(message.type_name, delivery.deliveries)

    async def _dead_letter(
        self, work: _Work, delivery: DurableDelivery, reason: Any, exc: CatgaError, message_id: str
    ) -> None:
        queue = work.queue
        letter = dead_letter_for(queue, delivery, reason, exc, message_id, self._settings.node_id)
        stored, level, counted = "dead-lettered", logging.WARNING, str(reason)
        try:
            added: bool | None = await self.store.add_dead_letter(letter, delivery.envelope)
            if not added:
                added = await self._replace_replayed(letter, delivery.envelope)
            while added is None:  # its replay has queued it and not yet dropped the old letter:
                # hold the message (not run it again) until the replay lets go of its claim
                await delivery.keep_alive()
                await asyncio.sleep(_REPLAYING_WAIT)
                added = await self._replace_replayed(letter, delivery.envelope)
            if not added:
                # One letter a message id: the one kept tells of this message (enqueued twice),
                # and was counted when it was stored.
                stored, counted = f"not dead-lettered again: dead letter {letter.id} is kept already", ""
        except MessageTooLargeError as too_large:  # NATS: its letter does not fit beside it, which
            # `dead_letter_room` prevents for what this version enqueued
            stored, level = f"dropped, as it cannot be dead-lettered ({too_large})", logging.ERROR
            counted = "dropped"
        await delivery.drop()
        if self._observer is not None and counted:
            self._observer.dead_lettered(queue.type_name, counted)
        logger.log(
            level,
            "durable %s %s %s (%s after %d deliveries): %s",
            queue.type_name, message_id, stored, reason, delivery.deliveries, letter.error,
        )  # fmt: skip
        answer = encode_error(exc, node_id=self._settings.node_id, max_payload=self._settings.max_payload)
        await self._answer(delivery.envelope, answer)

    async def _replace_replayed(self, letter: DeadLetter, envelope: Envelope) -> bool | None:
        """The store keeps a letter of this message already: when that letter is an earlier failure
        of a replay of it (fewer replays), this newer failure replaces it, and True. Else False (a
        copy of the message enqueued twice: the kept letter tells of it), or None while the replay
        that queued it holds its claim: it drops the old letter next, and would drop this one."""
        kept = await self.store.dead_letter(letter.id)
        if kept is not None and kept[0].replays >= letter.replays:
            return False
        key, holder = replay_claim(letter.id), new_message_id()
        if not await self.store.claim(key, holder, REPLAY_LEASE):
            return None
        try:
            if kept is not None:  # the replay that queued this ended without dropping it
                await self.store.remove_dead_letter(letter.id)
            return await self.store.add_dead_letter(letter, envelope)
        finally:
            with contextlib.suppress(CatgaError):  # the lease ends by itself
                await self.store.release(key, holder)

    async def _answer(self, request: Envelope, reply: Envelope) -> None:
        """Tell the node waiting for this command (if any) how it ended; a lost answer loses nothing:
        the caller also reads the done record."""
        caller = request.headers.get(REPLY_NODE)
        if type(caller) is not str or not caller:
            return
        reply.headers[MESSAGE_ID] = str(request.headers.get(MESSAGE_ID, ""))
        with contextlib.suppress(CatgaError):
            await self._transport.publish(result_subject(caller), reply)

    def _warn(self, kind: str, text: str, *args: object) -> None:
        self._log_limit.log(logger, logging.WARNING, kind, text, *args)
