"""`NatsTransport`: messaging over core NATS, on one `NatsConnection` per node.

Logical subjects (``node.<id>``, ``type.<name>``, ``event.<name>``) travel as
``catga.<cluster>.<subject>``. A message's payload is the envelope as `core.envelope.pack` frames
it: its headers as one JSON line, a newline, the body (not NATS headers: they cost nats-py several
microseconds each way). Requests get their replies on one inbox subscription per connection.

The client reconnects forever. Subscriptions survive a reconnect; membership watches end at a
disconnect, and the cluster layer starts new ones once the connection is back.

The hot path goes beneath nats-py's public calls, where this nats-py is one whose insides are
known (`DIRECT`; otherwise the public calls serve):
- received messages are taken as nats-py reads them (`_Direct`), not through its queue and task
  per subscription: that hop cost about a twentieth of a round trip's CPU, and what it bounded
  (messages read but not yet handled) the cluster layer bounds itself (a handler slot per request,
  "busy" past the limit; a bounded queue of waiting events);
- messages go out as ``PUB`` commands put on nats-py's outgoing buffer, which its flusher task
  writes (`_publish`): ``publish`` checks again, on every message, what holds already here
  (connected, not draining, the subject) and builds its command in three more calls, which cost
  about a tenth of a round trip. Subjects are checked once each (`NatsTransport._subject`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from fastapi_catga.core.envelope import DEFAULT_MAX_PAYLOAD, Envelope, encode_error, unpack
from fastapi_catga.exceptions import (
    ConfigurationError,
    MessageValidationError,
    NoResponderError,
    TransportError,
)
from fastapi_catga.transports._shared import BadFrames, PendingReplies, deliver, frame
from fastapi_catga.transports.base import ConnectionListener, Delivery, DeliveryCallback, Reply
from fastapi_catga.transports.nats.auth import NatsAuth
from fastapi_catga.transports.nats.connection import NatsConnection
from fastapi_catga.transports.nats.durable import NatsDurable
from fastapi_catga.transports.nats.errors import NatsErrors, raise_ours
from fastapi_catga.transports.nats.membership import NatsMembers

__all__ = ["NatsTransport"]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a bucket name, and a single subject token
_SUBJECT = re.compile(r"[^.\s*>]+(?:\.[^.\s*>]+)*")  # one NATS can publish to: tokens, no wildcard
_SUBJECTS_KEPT = 10_000  # checked subjects remembered (node and type names: a few hundred at most)
_NO_RESPONDERS = "503"  # the status the server sends to a request's inbox when nobody listens
# Where `_Direct` cannot stand in (a nats-py without the queue it replaces): per subscription,
# before nats-py drops messages as a slow consumer (counted, logged), a bound on what a node holds
# unread when its event loop falls behind.
_PENDING_MSGS = 65_536
_PENDING_BYTES = 64 * 1024 * 1024
_MAX_REFUSALS = 100  # error answers to unreadable requests waiting for the connection; past it, none
_FLUSH_TIMEOUT = 2  # s, for the PING round trips that confirm a (un)subscribe


async def _sync(nc: Client) -> None:
    """Return once the server has processed everything this connection sent so far.

    nats-py's ``flush()`` writes its PING straight to the socket, ahead of commands still queued
    for its flusher task, so the first PONG can come back before a SUB just sent is in place.
    The flusher writes while we wait for it, so the second PING follows the SUB.
    """
    await nc.flush(timeout=_FLUSH_TIMEOUT)
    await nc.flush(timeout=_FLUSH_TIMEOUT)


Take = Callable[[Msg], None]


class _Direct:
    """Stands in for a nats-py subscription's queue of received messages: each message ``put``
    there is handed to ``take`` at once, in nats-py's reader, with no task or queue hop between.

    ``take`` must not block. An error it raises is logged here: in nats-py's reader it would count
    as a broken connection.
    """

    __slots__ = ("_sub", "_take")

    def __init__(self, sub: NatsSubscription, take: Take) -> None:
        self._sub = sub
        self._take = take

    def put_nowait(self, msg: Msg) -> None:
        self._sub._pending_size -= len(msg.data)  # nats-py counts it as pending until taken
        try:
            self._take(msg)
        except Exception:
            logger.exception("handling a message on %s failed", msg.subject)

    # The rest of `asyncio.Queue` that nats-py uses on a subscription: nothing ever waits here.
    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    def task_done(self) -> None:
        pass

    async def join(self) -> None:
        pass


#: Whether this nats-py keeps received messages in ``Subscription._pending_queue``, and commands
#: to send in ``Client._pending`` for its flusher task (2.x does).
DIRECT = "_pending_queue" in vars(NatsSubscription(None)) and all(
    hasattr(Client(), name)
    for name in ("_pending", "_pending_data_size", "_max_pending_size", "_flush_queue")
)


def _publish(nc: Client, subject: str, data: bytes, reply: str, timeout: float) -> Awaitable[None]:
    """``nc.publish``; with `DIRECT`, without its checks of what the transport ensured already (a
    live connection, `NatsConnection.client`; a subject NATS can carry; nobody draining).

    A full outgoing buffer (the server stalls, or the socket is slower than the senders) makes
    the sender wait for the flusher, as ``publish`` does, but for ``timeout`` seconds at most:
    nats-py would wait without end (raises `TimeoutError`, nats-py's, as its request does).
    """
    if not DIRECT:
        return _bounded(nc.publish(subject, data, reply=reply), timeout)
    if len(data) > nc.max_payload:  # the server's, which a reconnect may have lowered
        raise nats.errors.MaxPayloadError
    command = b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), reply.encode(), len(data), data)
    nc._pending.append(command)
    nc._pending_data_size += len(command)
    if nc._pending_data_size > nc._max_pending_size > 0:
        return _bounded(nc._flush_pending(force_flush=True), timeout)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        return nc._flush_pending()  # wakes the flusher, which writes everything buffered by then
    return _DONE


async def _bounded(flushed: Awaitable[Any], timeout: float) -> None:
    try:
        async with asyncio.timeout(timeout):
            await flushed
    except TimeoutError:
        raise nats.errors.TimeoutError from None


class _Done:
    """An awaitable that is done at once (no coroutine made per message)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, Any, None]:
        return
        yield  # a generator function: one that stops at once


_DONE = _Done()


async def _subscribe(nc: Client, subject: str, take: Take, queue: str = "") -> NatsSubscription:
    if DIRECT:
        sub = await nc.subscribe(subject, queue=queue)  # no callback: nats-py starts no task
        sub._pending_queue = _Direct(sub, take)  # type: ignore[assignment]
        return sub

    async def callback(msg: Msg) -> None:
        take(msg)

    return await nc.subscribe(
        subject,
        queue=queue,
        cb=callback,
        pending_msgs_limit=_PENDING_MSGS,
        pending_bytes_limit=_PENDING_BYTES,
    )


class _Subscription:
    def __init__(self, sub: NatsSubscription, nc: Client, subscriptions: set[_Subscription]) -> None:
        self.sub = sub
        self._nc = nc
        self._subscriptions = subscriptions

    async def unsubscribe(self) -> None:
        self._subscriptions.discard(self)
        # A closed or draining connection delivers nothing more; a second call is fine too.
        with contextlib.suppress(nats.errors.Error):
            await self.sub.unsubscribe()
            # Until the server has the UNSUB it routes requests here, where they are dropped:
            # they would time out instead of failing at once with "no responders".
            await _sync(self._nc)


class NatsTransport:
    """One node's connection to NATS: a single server, or a cluster of them.

    Args:
        servers: ``nats://host:port`` URLs, as a sequence or one comma-separated string.
        cluster: the cluster name; namespaces subjects (``catga.<cluster>.``) and the KV bucket.
        max_payload: the largest envelope sent, headers included; lowered to the server's limit.
        connect_timeout: seconds to wait for the first connection, and for each JetStream call.
        ping_interval: seconds between pings; two unanswered pings count as a lost connection.
        reconnect_wait: seconds between reconnect attempts to one server (they never stop).
        connection_name: the connection's name in the server's monitoring.
        auth: credentials (user and password, token, nkey seed or .creds file) and TLS files.
    """

    name = "nats"
    supports_queue_groups = True

    def __init__(
        self,
        servers: str | Sequence[str] = "nats://localhost:4222",
        *,
        cluster: str = "catga",
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        connect_timeout: float = 5.0,
        ping_interval: float = 5.0,
        reconnect_wait: float = 0.5,
        connection_name: str | None = None,
        auth: NatsAuth | None = None,
    ) -> None:
        if not _NAME.fullmatch(cluster):
            raise ConfigurationError(f"cluster name {cluster!r} must match [A-Za-z0-9_-]+ for NATS")
        self._connection = NatsConnection(
            servers,
            connect_timeout=connect_timeout,
            ping_interval=ping_interval,
            reconnect_wait=reconnect_wait,
            connection_name=connection_name,
            on_lost=self._on_lost,
            auth=auth,
        )
        self.servers = self._connection.servers
        self.cluster = cluster
        self.max_payload = max_payload
        self.connect_timeout = connect_timeout
        self._prefix = f"catga.{cluster}."
        self._members = NatsMembers(self._connection, cluster)
        self._durable = NatsDurable(self._connection, cluster, lambda: self.max_payload)
        self._subscriptions: set[_Subscription] = set()
        self._inbox = ""  # "_INBOX.<unique>.": replies to this connection's requests
        self._pending: PendingReplies[Msg] = PendingReplies()
        self._bad_frames = BadFrames(logger)
        self._refusals: set[asyncio.Future[None]] = set()
        self._subjects: dict[str, str] = {}  # checked subject -> catga.<cluster>.<subject>

    @property
    def slow_consumers(self) -> int:
        """Messages nats-py dropped because a subscription's pending queue was full."""
        return self._connection.slow_consumers

    @property
    def bad_frames(self) -> int:
        """Messages received that were no catga frame (dropped, answered with an error where possible)."""
        return self._bad_frames.count

    @property
    def connected(self) -> bool:
        """Whether the connection is up right now (False while nats-py reconnects)."""
        return self._connection.up

    @property
    def members(self) -> NatsMembers:
        """The membership store in the KV bucket ``catga_<cluster>``."""
        return self._members

    @property
    def durable(self) -> NatsDurable:
        """Durable queues on JetStream streams, leases and done records in a KV bucket, dead letters."""
        return self._durable

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        """Call ``listener(False)`` at a disconnect and ``listener(True)`` once reconnected."""
        self._connection.state.add(listener)

    async def connect(self) -> None:
        """Connect, retrying until ``connect_timeout``; from then on reconnect forever.

        Raises:
            TransportError: no server answered within ``connect_timeout``; the message names them.
        """
        nc = await self._connection.open()
        self.max_payload = min(self.max_payload, nc.max_payload)
        self._inbox = nc.new_inbox() + "."
        await _subscribe(nc, self._inbox + "*", self._on_reply)
        self._connection.state.tell(True)
        logger.info("connected to NATS at %s (cluster %r)", self._connection.where, self.cluster)

    async def aclose(self) -> None:
        """Stop the watches, drop the subscriptions and close the connection; safe to call twice."""
        if self._connection.state.closed:
            return
        self._connection.state.close()
        await self._members.stop_watches()
        nc = self._connection.nc
        if nc is None:
            return
        if self._subscriptions and nc.is_connected:
            # Unsubscribe and wait for the server to confirm, so that peers' requests fail at once
            # with "no responders" rather than time out until it notices the closed socket.
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                async with asyncio.timeout(self.connect_timeout):
                    for subscription in list(self._subscriptions):
                        await subscription.sub.unsubscribe()
                    await _sync(nc)
        # Not nc.drain(): against a paused server it waits out its timeout plus a 10 s flush, then
        # logs a never-retrieved error. close() still writes what was published.
        await nc.close()

    async def _on_lost(self) -> None:
        # Replies to requests in flight would go to an inbox nobody holds now: fail them at once.
        where = self._connection.where
        self._pending.fail_all(
            TransportError(f"lost the NATS connection ({where}) while waiting for a reply")
        )
        await self._members.stop_watches()
        self._durable.connection_lost()

    # -- messaging ------------------------------------------------------------------------------

    async def subscribe(
        self, subject: str, callback: DeliveryCallback, *, queue: str | None = None
    ) -> _Subscription:
        """Call ``callback`` for every envelope on ``subject``; with ``queue``, one group member each."""
        nc = self._connection.live()[0]

        def on_msg(msg: Msg) -> None:
            reply = self._replier(msg.reply) if msg.reply else None
            try:
                envelope = unpack(msg.data)
            except MessageValidationError as exc:
                self._bad_frames.seen(msg.subject, exc)
                if reply is not None:  # tell the sender at once rather than let it time out
                    self._refuse(reply, exc)
                return
            deliver(callback, Delivery(envelope, reply), msg.subject, logger)

        with NatsErrors(f"subscribe {subject}"):
            sub = await _subscribe(nc, self._prefix + subject, on_msg, queue or "")
            await _sync(nc)  # now a request from any connection to this server finds the subscriber
        subscription = _Subscription(sub, nc, self._subscriptions)
        self._subscriptions.add(subscription)
        return subscription

    def _refuse(self, reply: Reply, error: MessageValidationError) -> None:
        """Answer an unreadable request with ``error``, in a task (a flood of them: at most
        `_MAX_REFUSALS` at once, the others go unanswered and time out)."""
        if len(self._refusals) >= _MAX_REFUSALS:
            return
        task = asyncio.ensure_future(reply(encode_error(error, node_id="", by_node=True)))
        self._refusals.add(task)
        task.add_done_callback(self._refused)

    def _refused(self, task: asyncio.Future[None]) -> None:
        self._refusals.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.debug("could not answer an unreadable request: %s", error)

    def _replier(self, inbox: str) -> Reply:
        return functools.partial(self._send, inbox)  # no coroutine of its own around the send

    async def _send(self, subject: str, envelope: Envelope) -> None:
        """Publish to ``subject`` as it is: a reply address the server gave, or one `_subject` made."""
        nc = self._connection.client()
        data = frame(envelope, self.max_payload, "NATS")
        try:
            await _publish(nc, subject, data, "", self.connect_timeout)
        except Exception as exc:
            raise_ours(exc, subject)
            raise

    def _subject(self, subject: str) -> str:
        """``catga.<cluster>.<subject>``, once ``subject`` is known to be one NATS can carry.

        Raises:
            MessageValidationError: it is empty, or has whitespace, a wildcard or an empty token.
        """
        full = self._subjects.get(subject)
        if full is None:
            if not _SUBJECT.fullmatch(subject):
                raise MessageValidationError(f"{subject[:200]!r} cannot be a NATS subject")
            full = self._prefix + subject
            if len(self._subjects) < _SUBJECTS_KEPT:
                self._subjects[subject] = full
        return full

    async def publish(self, subject: str, envelope: Envelope) -> None:
        """Send to every subscriber of ``subject``; NATS does not say how many, so this returns None."""
        await self._send(self._subject(subject), envelope)

    async def request(self, subject: str, envelope: Envelope, *, timeout: float) -> Envelope:
        """Send to one subscriber of ``subject`` and return its reply.

        Raises:
            NoResponderError: nobody listens on ``subject`` (NATS says so in well under a millisecond).
            RequestTimeoutError: no reply within ``timeout`` seconds.
            MessageTooLargeError: the envelope is over ``max_payload``; nothing was sent.
            MessageValidationError: ``subject`` is none NATS can carry; nothing was sent.
            TransportError: the connection is down or failed.
        """
        nc = self._connection.client()
        data = frame(envelope, self.max_payload, "NATS")
        full = self._subject(subject)
        # Not nc.request(): it starts a task per request (asyncio.wait_for) and costs about as much
        # again as the round trip. One inbox subscription, a table of futures and a timer instead.
        token, reply = self._pending.add(subject, timeout)
        try:
            await _publish(nc, full, data, self._inbox + token, timeout)
            msg = await reply
        except Exception as exc:
            raise_ours(exc, subject, timeout)
            raise
        finally:
            self._pending.discard(token)
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
            raise NoResponderError(f"nobody listens on {subject}")
        try:
            return unpack(msg.data)
        except MessageValidationError as exc:
            raise TransportError(f"unreadable reply on {subject}: {exc}") from exc

    def _on_reply(self, msg: Msg) -> None:
        self._pending.resolve(msg.subject[len(self._inbox) :], msg)
