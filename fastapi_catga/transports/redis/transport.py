"""`RedisTransport`: messaging over Redis pub/sub, and the membership store on the same server.

Subjects map to channels ``catga:{<cluster>}:<subject>`` (``catga:{<cluster>}:db<N>:<subject>`` on
a database N other than 0: pub/sub ignores databases, `channel_prefix`): the hash tag puts every
key and channel of a cluster in one Redis Cluster slot (`urls` says how the URL picks the
server). Pub/sub has no headers: a message is the envelope as `core.envelope.pack` frames it, one
JSON line of headers, a newline, the body; a request also carries the requester's reply channel
and a correlation id in those headers. ``PUBLISH`` answering 0 means nobody listens:
`NoResponderError` at once.

Two private connections carry the messaging, each owned by one task: the `ChannelReader` holds
every subscription, the `PublishWriter` sends every ``PUBLISH``. Membership commands
(`RedisMembers`) take a connection from a pool; durable queues (`RedisDurable`, Redis Streams) have
a pool of their own without retries, and a connection per blocking reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from urllib.parse import urlsplit

from pydantic import SecretStr
from redis.asyncio import Redis

from fastapi_catga.core.envelope import DEFAULT_MAX_PAYLOAD, Envelope, unpack
from fastapi_catga.core.logs import LogLimiter, redact_url
from fastapi_catga.core.tasks import cancel_and_wait
from fastapi_catga.exceptions import (
    ConfigurationError,
    MessageValidationError,
    NoResponderError,
    TransportError,
)
from fastapi_catga.transports._shared import BadFrames, PendingReplies, deliver, frame
from fastapi_catga.transports.base import ConnectionListener, ConnectionState, Delivery, DeliveryCallback
from fastapi_catga.transports.redis.connections import (
    command_pool,
    private_connection,
    security_options,
    sentinel_credentials,
    uses_tls,
)
from fastapi_catga.transports.redis.durable import RedisDurable
from fastapi_catga.transports.redis.errors import BROKER_ERRORS, first_connect_failure, redis_errors
from fastapi_catga.transports.redis.locate import LocatedConnection, PubSubCommands, follow
from fastapi_catga.transports.redis.membership import RedisMembers, channel_prefix
from fastapi_catga.transports.redis.reader import ChannelReader
from fastapi_catga.transports.redis.routes import end_with, take_route, with_route
from fastapi_catga.transports.redis.urls import target
from fastapi_catga.transports.redis.writer import PublishWriter
from fastapi_catga.transports.tls import TlsFiles

__all__ = ["RedisTransport"]

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_UNSENT = 10_000  # PUBLISHes queued for the writer before a reply waits for its own
#: What a closing transport gives its queued PUBLISHes (a stopping node's last replies) to go
#: out, within the node's bound on the close (`ClusterNode._stop`: 2 * CANCEL_GRACE).
_LAST_REPLIES_WAIT = 1.0

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Subscription:
    transport: RedisTransport
    channel: bytes
    callback: DeliveryCallback

    async def unsubscribe(self) -> None:
        await self.transport._unsubscribe(self.channel, self.callback)


class RedisTransport:
    """Messaging and membership over one Redis server (redis-py asyncio; install ``fastapi-catga[redis]``).

    Redis pub/sub has no queue groups: every subscriber of a channel gets every message, so the cluster
    layer picks a node by its own view and sends to that node's direct subject.

    Args:
        url: a ``redis://`` (or ``rediss://``, ``unix://``) URL; ``redis+sentinel://`` for the master
            that Sentinels name, ``redis+cluster://`` for a Redis Cluster (``rediss+...`` over TLS;
            see `locate`). Its password never shows in messages.
        cluster: namespaces every channel and key, so clusters can share one server.
        max_payload: the largest envelope sent, in bytes; a larger one is refused before sending.
        connect_timeout: the bound on connecting, and on every single command (nested retries in
            redis-py multiply otherwise).
        health_check_interval: the subscriber connection is PINGed after this many idle seconds, and
            declared lost when the PING gets no answer within as many more (a frozen server).
        max_connections: the pool for membership commands; callers wait for a free connection.
        username: an ACL user (``AUTH <username> <password>``); empty: ``default``.
        password: its password, or ``requirepass``'s; or give either in the URL, not both.
        tls: CA, client certificate and key, for a ``rediss://`` URL (``rediss+sentinel://``: the
            Sentinels' too, ``rediss+cluster://``: every node's).
        sentinel_username: the Sentinels' ACL user, when they ask for one; empty: ``default``.
        sentinel_password: the Sentinels' password (their ``requirepass``), when they ask for one.
    """

    name = "redis"
    supports_queue_groups = False

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        cluster: str = "catga",
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        connect_timeout: float = 5.0,
        health_check_interval: float = 5.0,
        max_connections: int = 50,
        username: str = "",
        password: SecretStr | None = None,
        tls: TlsFiles | None = None,
        sentinel_username: str = "",
        sentinel_password: SecretStr | None = None,
    ) -> None:
        self.url = url
        self.cluster = cluster
        self.max_payload = max_payload
        if not _NAME.fullmatch(cluster):
            raise ConfigurationError(f"cluster name {cluster!r} must match [A-Za-z0-9_-]{{1,64}}")
        self._where = where = redact_url(url)
        try:
            urlsplit(url).hostname  # noqa: B018 (it raises for an unclosed [ or no IP address in [ ])
        except ValueError:
            raise ConfigurationError(
                f"CATGA_REDIS_URL {where}: its host in [brackets] is no IPv6 address"
            ) from None
        self._timeout = connect_timeout
        self._idle = health_check_interval
        security = security_options(url, username=username, password=password, tls=tls)
        sentinels = sentinel_credentials(url, username=sentinel_username, password=sentinel_password)
        found = target(url, cluster=cluster, timeout=connect_timeout, sentinel=sentinels)
        self._locator = found.locator
        commands = PubSubCommands(found.locator)
        self._pool = command_pool(
            found.url,
            max_connections=max_connections,
            timeout=connect_timeout,
            health_check_interval=health_check_interval,
            security=security,
            locator=found.locator,
        )
        self._state = ConnectionState()
        # Pub/sub ignores the database: a cluster on another database names its channels apart.
        db = int(getattr(self._pool, "connection_kwargs", {}).get("db") or 0)
        channels = channel_prefix(cluster, db)
        self._members = RedisMembers(
            Redis(connection_pool=self._pool), cluster, self._command, commands, channels=channels
        )
        self._durable = RedisDurable(
            self._pool,
            cluster,
            self._command,
            max_payload=max_payload,
            max_connections=max_connections,
            timeout=connect_timeout,
        )
        self._prefix = channels
        self._inbox = f"{self._prefix}reply.{uuid.uuid4().hex}"
        self._internal: dict[bytes, Callable[[Envelope], None]] = {
            self._inbox.encode(): self._on_reply,
            self._members.events.encode(): self._members.on_notice,
        }
        self._handlers: dict[bytes, list[DeliveryCallback]] = {}
        self._pending: PendingReplies[Envelope] = PendingReplies()
        self._bad_frames = BadFrames(logger)
        self._reply_failures = LogLimiter()  # replies whose PUBLISH failed: a line per interval at most
        self._reader = ChannelReader(
            private_connection(self._pool),
            self._pool,
            where=where,
            timeout=connect_timeout,
            idle=health_check_interval,
            channels=lambda: [*self._internal, *self._handlers],
            on_message=self._on_message,
            on_lost=self._on_lost,
            on_back=functools.partial(self._state.tell, True),
            commands=commands,
        )
        self._writer = PublishWriter(
            private_connection(self._pool), where=where, timeout=connect_timeout, commands=commands
        )
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def members(self) -> RedisMembers:
        """The membership store, namespaced by cluster."""
        return self._members

    @property
    def durable(self) -> RedisDurable:
        """Durable queues (Redis Streams), leases, done records and dead letters, namespaced by cluster."""
        return self._durable

    @property
    def bad_frames(self) -> int:
        """Messages received that were no catga frame (dropped: their reply address is inside)."""
        return self._bad_frames.count

    @property
    def connected(self) -> bool:
        """Whether the subscriber connection is up and every subscription is in place."""
        return self._state.up

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        """Call ``listener(False)`` when the connection is lost and ``listener(True)`` once it is back."""
        self._state.add(listener)

    def _check(self) -> None:
        if not self._state.up:
            state = "closed" if self._state.closed else "not connected, or reconnecting"
            raise TransportError(f"Redis transport for {self._where} is {state}")

    def _command(self, what: str, extra: float = 0.0) -> AbstractAsyncContextManager[None]:
        """Check the connection, then bound the block by the command timeout (plus ``extra`` seconds,
        for a blocking read) and translate errors. ``MOVED`` or ``READONLY`` (the slot moved, the
        master was demoted) makes the subscriber reconnect: every connection then locates anew."""
        self._check()
        return redis_errors(what, self._where, self._timeout + extra, moved=self._reader.relocate)

    async def connect(self) -> None:
        """Connect, subscribe the reply and membership channels, start the reader and writer tasks.

        Raises:
            TransportError: nothing answered at the URL within ``connect_timeout``, or the server
                refused the credentials or the TLS handshake (the message says which).
        """
        if self._state.closed:
            raise TransportError("this Redis transport was closed; create a new one")
        if self._tasks:
            return
        try:
            async with asyncio.timeout(self._timeout):
                await self._reader.open()
        except BROKER_ERRORS as exc:
            await self._reader.aclose()
            why = first_connect_failure(exc, tls=uses_tls(self.url), timeout=self._timeout)
            raise TransportError(f"cannot connect to Redis at {self._where}: {why}") from exc
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._reader.run()), loop.create_task(self._writer.run())]
        if isinstance(subscriber := self._reader.connection, LocatedConnection):
            # Its reconnect makes the publisher reconnect too, to the same answer (the highest epoch).
            self._tasks.append(loop.create_task(follow(subscriber, self._idle, self._reader.relocate)))
        self._state.tell(True)

    async def aclose(self) -> None:
        """Send what is queued (for up to a second), stop both tasks, fail what is left in flight
        with `TransportError`, close every connection."""
        if self._state.closed:
            return
        up = self._state.up
        self._state.close()
        if up:  # the replies a stopping node queued last ("stopped while running") go out first
            await self._writer.drain(_LAST_REPLIES_WAIT)
        await cancel_and_wait(self._tasks, what="Redis transport", logger=logger)
        error = TransportError(f"the Redis transport for {self._where} was closed")
        self._lost(error)
        await self._writer.aclose(error)
        await self._reader.aclose()
        await self._durable.aclose()
        await self._pool.aclose()
        if self._locator is not None:
            await self._locator.aclose()

    def _lost(self, error: TransportError) -> None:
        """Fail what waits on the subscriber connection, end the watches, tell the listeners."""
        self._reader.fail_confirmations(error)
        self._pending.fail_all(error)
        self._members.end_watches()
        self._state.tell(False)

    def _on_lost(self) -> None:
        self._writer.mark_stale()
        self._durable.mark_stale()
        self._lost(TransportError(f"lost the connection to Redis at {self._where}"))

    # -- subscriptions --------------------------------------------------------------------------------

    async def subscribe(
        self, subject: str, callback: DeliveryCallback, *, queue: str | None = None
    ) -> _Subscription:
        """Deliver every envelope published to ``subject``; returns once Redis confirmed the subscription.

        Raises:
            ConfigurationError: ``queue`` given: Redis pub/sub has no queue groups.
            TransportError: not connected.
        """
        if queue is not None:
            raise ConfigurationError("Redis pub/sub has no queue groups; send to a node's direct subject")
        channel = (self._prefix + subject).encode()
        subscription = _Subscription(self, channel, callback)
        async with self._command(f"SUBSCRIBE {subject}"):
            callbacks = self._handlers.setdefault(channel, [])
            callbacks.append(callback)
            if len(callbacks) == 1:
                try:
                    await self._reader.confirmed("SUBSCRIBE", channel)
                except BaseException:
                    await subscription.unsubscribe()
                    raise
        return subscription

    async def _unsubscribe(self, channel: bytes, callback: DeliveryCallback) -> None:
        callbacks = self._handlers.get(channel, [])
        if callback in callbacks:
            callbacks.remove(callback)
        if callbacks or channel not in self._handlers:
            return
        del self._handlers[channel]
        with contextlib.suppress(TransportError):  # deliveries stopped here; a lost connection drops the rest
            async with self._command("UNSUBSCRIBE"):
                await self._reader.confirmed("UNSUBSCRIBE", channel)

    def _on_message(self, channel: bytes, data: bytes) -> None:
        try:
            envelope = unpack(data)
        except MessageValidationError as exc:  # no reply address to answer: it is in the frame
            self._bad_frames.seen(channel, exc)
            return
        internal = self._internal.get(channel)
        if internal is not None:
            internal(envelope)
            return
        reply_to, corr = take_route(envelope)
        reply = None if reply_to is None else functools.partial(self._reply, reply_to, corr)
        for callback in self._handlers.get(channel, ()):
            deliver(callback, Delivery(envelope, reply), channel, logger)

    def _on_reply(self, envelope: Envelope) -> None:
        self._pending.resolve(take_route(envelope)[1] or "", envelope)

    # -- publishing -----------------------------------------------------------------------------------

    async def publish(self, subject: str, envelope: Envelope) -> int:
        """Publish; returns how many subscribers Redis handed it to (0: nobody listens).

        Raises:
            MessageTooLargeError: over ``max_payload``; nothing was sent.
            TransportError: not connected, or the ``PUBLISH`` failed.
        """
        return await self._publish(self._prefix + subject, frame(envelope, self.max_payload, "Redis"))

    async def request(self, subject: str, envelope: Envelope, *, timeout: float) -> Envelope:
        """Publish to ``subject`` with this transport's reply channel and wait up to ``timeout`` s.

        Raises:
            MessageTooLargeError: over ``max_payload``; nothing was sent.
            NoResponderError: ``PUBLISH`` reached nobody.
            RequestTimeoutError: no reply within ``timeout``.
            TransportError: not connected, or the connection failed meanwhile.
        """
        token, reply = self._pending.add(subject, timeout)
        try:
            data = frame(with_route(envelope, self._inbox, token), self.max_payload, "Redis")
            self._check()
            sent = self._writer.enqueue(self._prefix + subject, data)
            # One wait, for the reply: a PUBLISH that reached nobody (or failed) ends it at once,
            # and the request's deadline ends the PUBLISH's wait too (a frozen server must not hold
            # the caller for the writer's whole command timeout).
            sent.add_done_callback(functools.partial(_counted, reply, subject))
            reply.add_done_callback(functools.partial(end_with, sent))
            return await reply
        finally:
            self._pending.discard(token)
            if reply.done() and not reply.cancelled():
                reply.exception()  # retrieved: it may have ended the PUBLISH wait instead

    async def _reply(self, reply_to: str, corr: str | None, envelope: Envelope) -> None:
        """Queue the reply's PUBLISH and return: a handler's run ends without waiting for Redis's
        count (on 3.11 it then needs no task of its own). With `_MAX_UNSENT` PUBLISHes already
        queued, it waits for its own, so that a stalled server holds handler slots, not memory."""
        data = frame(with_route(envelope, corr=corr), self.max_payload, "Redis")
        self._check()
        sent = self._writer.enqueue(reply_to, data)
        if self._writer.queued > _MAX_UNSENT:
            _replied(reply_to, await sent)
        else:
            sent.add_done_callback(functools.partial(self._sent_reply, reply_to))

    def _sent_reply(self, reply_to: str, sent: asyncio.Future[int]) -> None:
        if sent.cancelled():
            return
        error = sent.exception()
        if error is None:
            _replied(reply_to, sent.result())
        else:  # its batch failed (the writer's connection alone may have: say so here)
            self._reply_failures.log(
                logger, logging.WARNING, "reply", "could not answer a request on %s: %s", reply_to, error
            )

    async def _publish(self, channel: str, data: bytes) -> int:
        self._check()
        return await self._writer.publish(channel, data)


def _counted(reply: asyncio.Future[Envelope], subject: str, sent: asyncio.Future[int]) -> None:
    """A request's PUBLISH was counted (or failed): nobody listening ends the request at once."""
    if sent.cancelled():
        return
    error = sent.exception()  # retrieved either way
    if reply.done():
        return
    if error is not None:
        reply.set_exception(error)
    elif sent.result() == 0:
        reply.set_exception(NoResponderError(f"nobody listens on {subject} (PUBLISH reached 0)"))


def _replied(reply_to: str, count: int) -> None:
    if count == 0:
        logger.debug("the requester on %s is gone; reply dropped", reply_to)
