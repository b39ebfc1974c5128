"""`NatsTransport`: messaging over core NATS, on one `NatsConnection` per node.

Logical subjects (``node.<id>``, ``type.<name>``, ``event.<name>``) travel as
``catga.<cluster>.<subject>``. A message's payload is the envelope as `core.envelope.pack` frames
it: its headers as one JSON line, a newline, the body (not NATS headers: they cost nats-py several
microseconds each way). Requests get their replies on one inbox subscription per connection.

The client reconnects forever. Subscriptions survive a reconnect; membership watches end at a
disconnect, and the cluster layer starts new ones once the connection is back.

Messages are received and sent through `wire` (beneath nats-py's public calls, where it can);
subjects are checked once each (`NatsTransport._subject`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Sequence

import nats.errors
from nats.aio.client import Client
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
from fastapi_catga.transports.nats.connection import NatsConnection, end_reconnecting
from fastapi_catga.transports.nats.durable import NatsDurable
from fastapi_catga.transports.nats.errors import NatsErrors, raise_ours
from fastapi_catga.transports.nats.membership import NatsMembers
from fastapi_catga.transports.nats.wire import publish, subscribe

__all__ = ["NatsTransport"]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a bucket name, and a single subject token
_SUBJECT = re.compile(r"[^.\s*>]+(?:\.[^.\s*>]+)*")  # one NATS can publish to: tokens, no wildcard
_SUBJECTS_KEPT = 10_000  # checked subjects remembered (node and type names: a few hundred at most)
_NO_RESPONDERS = "503"  # the status the server sends to a request's inbox when nobody listens
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
        self._pending: PendingReplies[bytes | None] = PendingReplies()  # None: "no responders"
        self._bad_frames = BadFrames(logger)
        self._refusals: set[asyncio.Future[None]] = set()
        self._subjects: dict[str, str] = {}  # checked subject -> catga.<cluster>.<subject>

    @property
    def slow_consumers(self) -> int:
        """Messages nats-py dropped because a subscription's pending queue was full: only on a
        nats-py whose insides `wire` does not know (otherwise a message is handed over as it is
        read, and a node that cannot keep up is a slow consumer to the server, which disconnects it)."""
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
        await subscribe(nc, self._inbox + "*", self._on_reply)
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
        try:
            await nc.close()
        finally:
            await end_reconnecting(nc)

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

        def on_msg(subject: str, reply_to: str, data: bytes, headers: dict[str, str] | None) -> None:
            reply = self._replier(reply_to) if reply_to else None
            try:
                envelope = unpack(data)
            except MessageValidationError as exc:
                self._bad_frames.seen(subject, exc)
                if reply is not None:  # tell the sender at once rather than let it time out
                    self._refuse(reply, exc)
                return
            deliver(callback, Delivery(envelope, reply), subject, logger)

        with NatsErrors(f"subscribe {subject}"):
            sub = await subscribe(nc, self._prefix + subject, on_msg, queue or "")
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
            await publish(nc, subject, data, "", self.connect_timeout)
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
            await publish(nc, full, data, self._inbox + token, timeout)
            answer = await reply
        except Exception as exc:
            raise_ours(exc, subject, timeout)
            raise
        finally:
            self._pending.discard(token)
            if reply.done() and not reply.cancelled():
                reply.exception()  # retrieved: its deadline may have passed while the publish waited
        if answer is None:
            raise NoResponderError(f"nobody listens on {subject}")
        try:
            return unpack(answer)
        except MessageValidationError as exc:
            raise TransportError(f"unreadable reply on {subject}: {exc}") from exc

    def _on_reply(self, subject: str, _reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        no_responders = headers is not None and headers.get("Status") == _NO_RESPONDERS
        self._pending.resolve(subject[len(self._inbox) :], None if no_responders else data)
