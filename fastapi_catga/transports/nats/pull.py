"""`NatsConsumer`: one node's reader of a durable pull consumer, with its own pull requests.

Not nats-py's ``PullSubscription.fetch``: it hands out every message its subscription holds, however
many were asked for (a lingering request's late messages pile up there), and its lingering request
outlives a fetch that returned early, taking the next message to nobody (nats.py#933, #986).

Here a pull is a request to ``$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`` that surely ends:
``no_wait`` first (what is there now, up to the limit), then, if nothing was, one message with an
expiry. The server ends each by sending the whole batch or a status (404, 408, 409) to the pull's
own reply subject; its messages come on their own subjects. One pull at a time per reader: a
message that comes when none is in flight (its pull ended on our side first) is handed back at
once (``nak``) rather than after its lease.

A pull for a consumer that is gone gets a 503 (nats-server 2.9: no answer, then the consumer info
says so; nats.py#504). The reader then makes the stream and consumer again, logged once, retried
with a growing pause; ``fetch`` still waits out its ``wait`` meanwhile, so a caller never spins.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from fastapi_catga.core.envelope import Envelope, unpack
from fastapi_catga.exceptions import CatgaError, MessageValidationError, TransportError
from fastapi_catga.transports._shared import BadFrames
from fastapi_catga.transports.durable import DurableDelivery, Queue
from fastapi_catga.transports.nats.connection import NatsConnection
from fastapi_catga.transports.nats.errors import NatsErrors

__all__ = ["NatsConsumer", "NatsDelivery"]

logger = logging.getLogger(__name__)

_GRACE = 1.0  # s past a pull's expiry for the server's answer; then the broker counts as unreachable
_MIN_WAIT = 0.01  # s: less is not worth a lingering pull
_PAUSE = 0.1  # s after a pull the server cut short (409: leader change, too many waiting pulls)
_RESTORE_FIRST, _RESTORE_MAX = 0.25, 5.0  # s between attempts to create a lost consumer again
_NO_RESPONDERS = "503"
_HEARTBEAT = "100"


@dataclass(slots=True, eq=False)
class NatsDelivery:
    """One JetStream delivery; the broker counts ``deliveries`` (``num_delivered``)."""

    envelope: Envelope
    deliveries: int
    msg: Msg
    connection: NatsConnection

    async def ack(self) -> None:
        """Ack and wait for the server to confirm it (a lost ack would mean a redelivery)."""
        self.connection.live()
        with NatsErrors(f"ack of {self.msg.subject}"), contextlib.suppress(nats.errors.MsgAlreadyAckdError):
            await self.msg.ack_sync(timeout=self.connection.connect_timeout)

    async def retry(self, delay: float) -> None:
        self.connection.live()
        with NatsErrors(f"nak of {self.msg.subject}"), contextlib.suppress(nats.errors.MsgAlreadyAckdError):
            await self.msg.nak(delay=delay if delay > 0 else None)

    async def keep_alive(self) -> None:
        self.connection.live()
        with NatsErrors(f"in-progress of {self.msg.subject}"):
            await self.msg.in_progress()

    async def drop(self) -> None:
        """``term``: no redelivery; a WorkQueue stream deletes it as if acked."""
        self.connection.live()
        with NatsErrors(f"term of {self.msg.subject}"), contextlib.suppress(nats.errors.MsgAlreadyAckdError):
            await self.msg.term()


class NatsConsumer:
    """Pulls from one durable consumer (see the module); ``fetch`` never returns more than asked."""

    def __init__(
        self,
        connection: NatsConnection,
        queue: Queue,
        *,
        stream: str,
        name: str,
        reader: str,
        lease: float,
        restore: Callable[[Queue, float], Awaitable[None]],
        readers: set[NatsConsumer],
        bad_frames: BadFrames,
    ) -> None:
        self._connection = connection
        self._queue = queue
        self._stream = stream
        self._name = name
        self._where = f"consumer {name} of stream {stream} (reader {reader})"
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}"
        self._lease = lease
        self._restore = restore
        self._readers = readers
        self._bad_frames = bad_frames
        self._sub: Subscription | None = None
        self._inbox = ""
        self._tokens = itertools.count()
        self._token = ""  # the reply token of the pull in flight, if any
        self._answers: asyncio.Queue[Msg | None] = asyncio.Queue()
        self._fetching = asyncio.Lock()
        self._closed = False
        self._missing = False  # the server said nobody serves our pulls: the consumer is gone
        self._restore_at = 0.0
        self._restore_pause = _RESTORE_FIRST

    async def fetch(self, limit: int, wait: float) -> list[DurableDelivery]:
        """Up to ``limit`` deliveries; waits up to ``wait`` s for the first.

        Raises:
            TransportError: the connection is down, or the server did not answer a pull.
        """
        async with self._fetching:  # one pull at a time: a message is matched to the pull in flight
            return await self._fetch(limit, wait)

    async def _fetch(self, limit: int, wait: float) -> list[DurableDelivery]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait)
        while not self._closed and limit > 0:
            if self._missing and loop.time() >= self._restore_at:
                await self._restore_consumer()
            if not self._missing and (msgs := await self._take(limit, deadline)):
                return [self._delivery(msg) for msg in msgs]
            if self._missing and loop.time() >= self._restore_at:
                continue  # found gone just now: make it again at once, whatever the time left
            left = deadline - loop.time()
            if left < _MIN_WAIT:
                break
            # Gone: wait for the next attempt to make it again. Cut short (409): no hot loop either.
            pause = max(self._restore_at - loop.time(), _MIN_WAIT) if self._missing else _PAUSE
            await asyncio.sleep(min(left, pause))
        return []

    async def _take(self, limit: int, deadline: float) -> list[Msg]:
        """What is there now, up to ``limit``; if nothing, the first message to come before ``deadline``."""
        msgs = await self._pull(limit, expires=None)
        if self._missing:
            return msgs
        self._restore_pause = _RESTORE_FIRST  # it answered: a later loss starts with a short pause again
        left = deadline - asyncio.get_running_loop().time()
        if msgs or left < _MIN_WAIT:
            return msgs
        return await self._pull(1, expires=left)

    async def close(self) -> None:
        """Stop pulling; deliveries not acked come back after their lease."""
        self._closed = True
        self._readers.discard(self)
        self.interrupt()
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    def interrupt(self) -> None:
        """End the pull in flight (the connection dropped: its answer would never come)."""
        if self._token:
            self._answers.put_nowait(None)

    # -- one pull --------------------------------------------------------------------------------------

    async def _pull(self, batch: int, *, expires: float | None) -> list[Msg]:
        nc = self._connection.live()[0]
        if self._sub is None:
            with NatsErrors(f"subscribe for {self._where}"):
                self._inbox = nc.new_inbox() + "."
                self._sub = await nc.subscribe(self._inbox + "*", cb=self._on_msg)
        self._token = str(next(self._tokens))
        self._answers = asyncio.Queue()
        request: dict[str, object] = {"batch": batch}
        if expires is None:
            request["no_wait"] = True  # with "expires" too, the server would ignore it
        else:
            request["expires"] = int(expires * 1e9)
        try:
            with NatsErrors(f"pull from {self._where}"):
                await nc.publish(self._next, json.dumps(request).encode(), reply=self._inbox + self._token)
            return await self._answered(batch, (expires or 0.0) + _GRACE)
        finally:
            self._token = ""

    async def _answered(self, batch: int, within: float) -> list[Msg]:
        """The messages of the pull in flight, until the batch is full or a status ends it."""
        got: list[Msg] = []
        try:
            async with asyncio.timeout(within):
                while len(got) < batch:
                    msg = await self._answers.get()
                    if msg is None:
                        if self._closed:
                            return got
                        raise TransportError(f"lost the NATS connection during a pull from {self._where}")
                    status = msg.headers.get("Status") if msg.headers else None
                    if status is None:
                        got.append(msg)
                    elif status != _HEARTBEAT:
                        self._ended(status, msg.headers.get("Description", "") if msg.headers else "")
                        break
        except TimeoutError:
            if not got:
                await self._unanswered(within)
        return got

    async def _unanswered(self, within: float) -> None:
        """No answer at all: nats-server 2.9 ignores pulls for a consumer that does not exist (later
        servers answer 503). Ask whether it does; if it does, the broker is not answering."""
        js = self._connection.live()[1]
        with NatsErrors(f"consumer info of {self._where}"):
            try:
                await js.consumer_info(self._stream, self._name)
            except nats.js.errors.NotFoundError:
                self._ended(_NO_RESPONDERS, "")
                return
        raise TransportError(f"NATS did not answer a pull from {self._where} within {within:.1f} s")

    def _ended(self, status: str, description: str) -> None:
        if status == _NO_RESPONDERS or "consumer deleted" in description.lower():
            if not self._missing:
                logger.warning("%s is gone (a server lost its store?); making it again", self._where)
            self._missing = True

    async def _on_msg(self, msg: Msg) -> None:
        # Statuses come on the reply subject of their pull; messages on their own subject.
        if msg.headers and "Status" in msg.headers:
            if msg.subject == self._inbox + self._token:
                self._answers.put_nowait(msg)
        elif self._token:
            self._answers.put_nowait(msg)
        else:  # came after its pull was over: hand it back now, not after its lease
            with contextlib.suppress(nats.errors.Error):
                await msg.nak()

    async def _restore_consumer(self) -> None:
        self._restore_at = asyncio.get_running_loop().time() + self._restore_pause
        self._restore_pause = min(self._restore_pause * 2, _RESTORE_MAX)
        try:
            await self._restore(self._queue, self._lease)
        except CatgaError as exc:
            if not self._connection.up:
                raise
            logger.debug("%s: not made again yet: %s", self._where, exc)
            return
        self._missing = False
        logger.info("%s made again", self._where)

    def _delivery(self, msg: Msg) -> NatsDelivery:
        try:
            envelope = unpack(msg.data)
        except MessageValidationError as exc:
            # Kept as the body of an envelope without headers: the cluster layer dead-letters it as
            # invalid, with its bytes, rather than it vanishing here.
            self._bad_frames.seen(msg.subject, exc)
            envelope = Envelope({}, msg.data)
        return NatsDelivery(envelope, msg.metadata.num_delivered, msg, self._connection)
