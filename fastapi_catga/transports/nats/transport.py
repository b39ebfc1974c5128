"""The NATS transport: core NATS for messages, a JetStream KV bucket for membership.

Logical subjects (``node.<id>``, ``type.<name>``, ``event.<name>``) travel as
``catga.<cluster>.<subject>``; envelope headers are NATS message headers and the body is the
payload. Members live in the KV bucket ``catga_<cluster>``, one key per node id whose value is the
node's JSON record (``nats kv get catga_<cluster> <node id>`` shows it)::

    transport = NatsTransport("nats://n1:4222,nats://n2:4222", cluster="orders")
    await transport.connect()

The client reconnects forever. Subscriptions survive a reconnect; membership watches end at a
disconnect, and the cluster layer starts new ones once the connection is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import re
from collections.abc import AsyncIterator, Sequence
from typing import Any

try:
    import nats.errors
    import nats.js.errors
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription as NatsSubscription
    from nats.js import JetStreamContext, api
    from nats.js.kv import KeyValue
except ImportError as e:
    if e.name != "nats" and not (e.name or "").startswith("nats."):
        raise
    raise ImportError('NATS transport needs nats-py: pip install "fastapi-catga[nats]"') from e

from fastapi_catga.core.envelope import DEFAULT_MAX_PAYLOAD, Envelope, encode_error, pack, unpack
from fastapi_catga.exceptions import (
    CatgaError,
    ConfigurationError,
    MessageTooLargeError,
    MessageValidationError,
    NoResponderError,
    RequestTimeoutError,
    TransportError,
)
from fastapi_catga.transports.base import (
    ConnectionListener,
    ConnectionState,
    Delivery,
    DeliveryCallback,
    MemberEvent,
    Reply,
)

__all__ = ["NatsTransport"]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a bucket name, and a single subject token
_KEY = re.compile(r"[A-Za-z0-9_=-]+(\.[A-Za-z0-9_=-]+)*")  # a KV key: no leading, trailing or double dot
_NO_RESPONDERS = "503"  # the status the server sends to a request's inbox when nobody listens
_PENDING_MSGS = 1_000_000  # per subscription, before nats-py drops messages as a slow consumer
_PENDING_BYTES = 512 * 1024 * 1024
_FLUSH_TIMEOUT = 2  # s, for the PING round trips that confirm a (un)subscribe
_CONSUMER_IDLE = 5.0  # s: the server deletes a KV consumer this long after its subscriber went
# Expiry markers written by the server (2.11+) carry a reason instead of KV-Operation.
_REMOVED_REASONS = frozenset({"MaxAge", "Purge", "Remove"})
_NO_JETSTREAM = "JetStream did not answer (is the server started with -js? was the bucket prepared since?)"
_NO_JETSTREAM_ERRORS = (
    nats.errors.NoRespondersError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,  # the bucket's stream is gone: a server lost its store
)


class _NatsErrors:
    """Raises nats-py's errors as ours at the boundary, like httpx's ``map_httpcore_exceptions``.

    With ``timeout`` (a request) a timeout is `RequestTimeoutError` and "no responders" is
    `NoResponderError`; anywhere else both mean the broker failed: `TransportError`. A class, not a
    ``@contextmanager``: it wraps every request and reply, and costs a fifth as much.
    """

    __slots__ = ("timeout", "what")

    def __init__(self, what: str, timeout: float | None = None) -> None:
        self.what = what
        self.timeout = timeout

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None or isinstance(exc, CatgaError):
            return
        what, timeout = self.what, self.timeout
        if isinstance(exc, nats.errors.NoRespondersError) and timeout is not None:
            raise NoResponderError(f"nobody listens on {what}") from exc
        if isinstance(exc, _NO_JETSTREAM_ERRORS):
            raise TransportError(f"{what}: {_NO_JETSTREAM}") from exc
        if isinstance(exc, TimeoutError):  # nats.errors.TimeoutError is one too
            if timeout is None:
                raise TransportError(f"{what}: NATS did not answer in time") from exc
            raise RequestTimeoutError(f"no reply on {what} within {timeout:.3f} s") from exc
        if isinstance(exc, nats.errors.MaxPayloadError):
            raise MessageTooLargeError(f"{what}: over the server's max_payload") from exc
        if isinstance(exc, nats.errors.Error | OSError):
            raise TransportError(f"{what}: {type(exc).__name__}: {exc}") from exc


async def _sync(nc: Client) -> None:
    """Return once the server has processed everything this connection sent so far.

    nats-py's ``flush()`` writes its PING straight to the socket, ahead of commands still queued
    for its flusher task, so the first PONG can come back before a SUB just sent is in place.
    The flusher writes while we wait for it, so the second PING follows the SUB.
    """
    await nc.flush(timeout=_FLUSH_TIMEOUT)
    await nc.flush(timeout=_FLUSH_TIMEOUT)


class _Subscription:
    def __init__(self, sub: NatsSubscription, nc: Client, transport: NatsTransport) -> None:
        self._sub = sub
        self._nc = nc
        self._transport = transport

    async def unsubscribe(self) -> None:
        self._transport._subscriptions.discard(self)
        # A closed or draining connection delivers nothing more; a second call is fine too.
        with contextlib.suppress(nats.errors.Error):
            await self._sub.unsubscribe()
            # Until the server has the UNSUB it routes requests here, where they are dropped:
            # they would time out instead of failing at once with "no responders".
            await _sync(self._nc)


def _expire(reply: asyncio.Future[Msg]) -> None:
    if not reply.done():
        reply.set_exception(nats.errors.TimeoutError())


def _member_event(msg: Msg, prefix: str) -> MemberEvent | None:
    """The change a message on the bucket's stream stands for (None: a marker of unknown meaning)."""
    headers = msg.headers or {}
    key = msg.subject[len(prefix) :]
    reason = headers.get("Nats-Marker-Reason")
    if headers.get("KV-Operation") in ("DEL", "PURGE") or reason in _REMOVED_REASONS:
        return MemberEvent("delete", key)
    return MemberEvent("put", key, msg.data) if reason is None else None


class _Watch:
    """Member events from an ordered JetStream consumer on the bucket; ends at `stop` or a disconnect.

    Not nats-py's ``kv.watch()``: its iterator never ends when the connection closes, and its
    ``stop()`` raises on a closed connection before it wakes the iterator.
    """

    def __init__(self, transport: NatsTransport, prefix: str) -> None:
        self._transport = transport
        self._prefix = prefix
        self._queue: asyncio.Queue[MemberEvent | None] = asyncio.Queue()
        self._sub: JetStreamContext.PushSubscription | None = None

    async def on_msg(self, msg: Msg) -> None:
        if (event := _member_event(msg, self._prefix)) is not None:
            self._queue.put_nowait(event)

    async def __aiter__(self) -> AsyncIterator[MemberEvent]:
        while (event := await self._queue.get()) is not None:
            yield event
        self._queue.put_nowait(None)  # ended for good: iterating again ends at once too

    async def stop(self) -> None:
        """Stop watching: the iterator ends, the consumer's subscription goes."""
        self._transport._watches.discard(self)
        self._queue.put_nowait(None)
        sub, self._sub = self._sub, None
        if sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()


class _Members:
    """The membership store: KV bucket ``catga_<cluster>``; expiry by per-key TTL (2.11+) or max_age."""

    def __init__(self, transport: NatsTransport) -> None:
        self._transport = transport
        self.bucket = f"catga_{transport.cluster}"
        self._kv: KeyValue | None = None
        self._per_key_ttl = False

    def _ready(self) -> tuple[JetStreamContext, KeyValue]:
        js = self._transport._check()[1]
        if self._kv is None:
            raise ConfigurationError("call members.prepare(ttl) before using the membership store")
        return js, self._kv

    async def prepare(self, ttl: float) -> None:
        js, seconds = self._transport._check()[1], max(1, math.ceil(ttl))
        with _NatsErrors(f"preparing KV bucket {self.bucket}"):
            try:
                self._kv = await js.key_value(self.bucket)
            except nats.js.errors.BucketNotFoundError:
                self._kv = await self._create(js, seconds)
            config = (await self._kv.status()).stream_info.config
        # Per-key TTLs need a stream that allows them: not on 2.9, nor on a bucket 2.9 made.
        self._per_key_ttl = bool(config.allow_msg_ttl)
        if config.max_age != seconds:
            logger.warning(
                "KV bucket %s keeps records %s s, not %s s: it was made with another TTL "
                "(`nats kv del %s` lets the next start make it anew)",
                self.bucket, config.max_age, seconds, self.bucket,
            )  # fmt: skip

    async def _create(self, js: JetStreamContext, seconds: int) -> KeyValue:
        # max_age expires records on every server (2.9 ignores per-key TTLs); limit_marker_ttl
        # makes 2.11+ (JetStream API level 1+, None before) write expiry markers that watchers see.
        level = (await js.account_info()).api.level
        markers: dict[str, Any] = {"limit_marker_ttl": seconds} if level is not None and level >= 1 else {}
        # On a NATS cluster, keep three copies so membership outlives the loss of one server.
        replicas = [3, 1] if len(self._transport._check()[0].servers) >= 3 else [1]
        for count in replicas:
            try:
                return await js.create_key_value(
                    bucket=self.bucket, history=1, ttl=seconds, replicas=count, **markers
                )
            except nats.js.errors.APIError as exc:
                try:  # another node may have made it first, with another config
                    return await js.key_value(self.bucket)
                except nats.js.errors.BucketNotFoundError:
                    logger.info("KV bucket %s with %d replica(s) refused (%s)", self.bucket, count, exc)
        raise TransportError(f"cannot create KV bucket {self.bucket}; is JetStream enabled (-js)?")

    async def put(self, node_id: str, value: bytes, ttl: float) -> None:
        js, key = self._ready()[0], _key(node_id)
        # kv.put() takes no TTL: publish to the key's subject, with a TTL where the server keeps it.
        msg_ttl = max(1, math.ceil(ttl)) if self._per_key_ttl else None
        with _NatsErrors(f"KV put {self.bucket}.{key}"):
            await js.publish(f"$KV.{self.bucket}.{key}", value, msg_ttl=msg_ttl)

    async def delete(self, node_id: str) -> None:
        kv, key = self._ready()[1], _key(node_id)
        with _NatsErrors(f"KV delete {self.bucket}.{key}"):
            await kv.delete(key)

    async def list(self) -> dict[str, bytes]:
        # Not kv.keys() or kv.watchall(): they end the snapshot when consumer_info() reports nothing
        # pending, which it also does once everything is sent but not yet read, so they miss keys.
        # A consumer's create response counts what it will send, atomically.
        nc, js = self._transport._check()
        self._ready()
        prefix, done = f"$KV.{self.bucket}.", asyncio.Event()
        records: dict[str, bytes] = {}

        async def on_msg(msg: Msg) -> None:
            event = _member_event(msg, prefix)
            if event is not None and event.kind == "put":
                records[event.node_id] = msg.data
            elif event is not None:
                records.pop(event.node_id, None)
            if msg.metadata.num_pending == 0:
                done.set()

        with _NatsErrors(f"KV list {self.bucket}"):
            sub = await nc.subscribe(nc.new_inbox(), cb=on_msg)
            try:
                info = await js.add_consumer(
                    f"KV_{self.bucket}",
                    deliver_subject=sub.subject,
                    deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
                    ack_policy=api.AckPolicy.NONE,
                    filter_subject=f"{prefix}>",
                    mem_storage=True,
                    inactive_threshold=_CONSUMER_IDLE,
                )
                if info.num_pending:
                    async with asyncio.timeout(self._transport.connect_timeout):
                        await done.wait()
            finally:
                await sub.unsubscribe()
        return records

    async def watch(self) -> _Watch:
        js = self._ready()[0]
        watch = _Watch(self._transport, prefix=f"$KV.{self.bucket}.")
        with _NatsErrors(f"KV watch {self.bucket}"):
            watch._sub = await js.subscribe(
                f"$KV.{self.bucket}.>",
                stream=f"KV_{self.bucket}",
                cb=watch.on_msg,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
                inactive_threshold=_CONSUMER_IDLE,
            )
        self._transport._watches.add(watch)
        return watch


def _key(node_id: str) -> str:
    if not _KEY.fullmatch(node_id):
        raise ConfigurationError(f"node id {node_id!r} is no NATS KV key ([A-Za-z0-9_=.-], no edge dots)")
    return node_id


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
    ) -> None:
        if not _NAME.fullmatch(cluster):
            raise ConfigurationError(f"cluster name {cluster!r} must match [A-Za-z0-9_-]+ for NATS")
        urls = servers.split(",") if isinstance(servers, str) else servers
        self.servers = [url.strip() for url in urls if url.strip()]
        if not self.servers:
            raise ConfigurationError("no NATS server URL given (CATGA_NATS_URL, e.g. nats://localhost:4222)")
        self.cluster = cluster
        self.max_payload = max_payload
        self.connect_timeout = connect_timeout
        #: Messages nats-py dropped because a subscription's pending queue was full.
        self.slow_consumers = 0
        # nats-py annotates the durations as int; they are float seconds.
        self._options: dict[str, Any] = {
            "name": connection_name,
            "connect_timeout": connect_timeout,
            "ping_interval": ping_interval,
            "reconnect_time_wait": reconnect_wait,
        }
        self._where = ", ".join(self.servers)
        self._prefix = f"catga.{cluster}."
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._closed = False
        self._state = ConnectionState()
        self._last_error = ""
        self._members = _Members(self)
        self._watches: set[_Watch] = set()
        self._subscriptions: set[_Subscription] = set()
        self._inbox = ""  # "_INBOX.<unique>.": replies to this connection's requests
        self._tokens = itertools.count()
        self._pending: dict[str, asyncio.Future[Msg]] = {}

    @property
    def connected(self) -> bool:
        """Whether the connection is up right now (False while nats-py reconnects)."""
        return self._nc is not None and self._nc.is_connected

    @property
    def members(self) -> _Members:
        """The membership store in the KV bucket ``catga_<cluster>``."""
        return self._members

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        """Call ``listener(False)`` at a disconnect and ``listener(True)`` once reconnected."""
        self._state.add(listener)

    async def connect(self) -> None:
        """Connect, retrying until ``connect_timeout``; from then on reconnect forever.

        Raises:
            TransportError: no server answered within ``connect_timeout``; the message names them.
        """
        if self._closed or self._nc is not None:
            raise TransportError("connect() works once per NatsTransport; make a new one")
        self._nc = nc = Client()
        try:
            # With unlimited reconnects nats-py retries the first connect forever too: bound it.
            async with asyncio.timeout(self.connect_timeout):
                await nc.connect(
                    self.servers,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    max_outstanding_pings=2,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                    **self._options,
                )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            self._closed = True
            await nc.close()
            raise TransportError(
                f"cannot reach NATS at {self._where} within {self.connect_timeout} s"
            ) from exc
        self._js = nc.jetstream(timeout=self.connect_timeout)
        self.max_payload = min(self.max_payload, nc.max_payload)
        self._inbox = nc.new_inbox() + "."
        await nc.subscribe(
            self._inbox + "*",
            cb=self._on_reply,
            pending_msgs_limit=_PENDING_MSGS,
            pending_bytes_limit=_PENDING_BYTES,
        )
        self._set_up(True)
        logger.info("connected to NATS at %s (cluster %r)", self._where, self.cluster)

    async def aclose(self) -> None:
        """Stop the watches, drop the subscriptions and close the connection; safe to call twice."""
        if self._closed:
            return
        self._closed, self._state.up = True, False
        for watch in list(self._watches):
            await watch.stop()
        if self._nc is None:
            return
        if self._subscriptions and self._nc.is_connected:
            # Unsubscribe and wait for the server to confirm, so that peers' requests fail at once
            # with "no responders" rather than time out until it notices the closed socket.
            with contextlib.suppress(TimeoutError, nats.errors.Error):
                async with asyncio.timeout(self.connect_timeout):
                    for subscription in list(self._subscriptions):
                        await subscription._sub.unsubscribe()
                    await _sync(self._nc)
        # Not nc.drain(): against a paused server it waits out its timeout plus a 10 s flush, then
        # logs a never-retrieved error. close() still writes what was published.
        await self._nc.close()

    # -- connection events (nats-py wants async callbacks) ---------------------------------------

    def _set_up(self, up: bool) -> None:
        if not self._closed:
            self._state.tell(up)

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            self.slow_consumers += 1
        text = f"{type(exc).__name__}: {exc}"
        # The same error again (each reconnect attempt while the server is down) is only DEBUG.
        level = logging.DEBUG if text == self._last_error else logging.WARNING
        self._last_error = text
        logger.log(level, "NATS error (%s): %s", self._where, text)

    async def _on_disconnected(self) -> None:
        if self._closed:
            return
        logger.warning("lost the NATS connection (%s); reconnecting", self._where)
        # Replies to requests in flight would go to an inbox nobody holds now: fail them at once.
        lost = TransportError(f"lost the NATS connection ({self._where}) while waiting for a reply")
        for reply in self._pending.values():
            if not reply.done():
                reply.set_exception(lost)
        for watch in list(self._watches):
            await watch.stop()
        self._set_up(False)

    async def _on_reconnected(self) -> None:
        self._last_error = ""
        logger.info("reconnected to NATS (%s)", self._where)
        self._set_up(True)

    async def _on_closed(self) -> None:
        if not self._closed:
            logger.warning("the NATS connection closed for good (%s)", self._where)

    # -- messaging ------------------------------------------------------------------------------

    def _check(self) -> tuple[Client, JetStreamContext]:
        if self._nc is None or self._js is None or not self._nc.is_connected:
            state = "closed" if self._closed else "not connected" if self._nc is None else "reconnecting"
            raise TransportError(f"NATS at {self._where} is unreachable ({state})")
        return self._nc, self._js

    def _frame(self, envelope: Envelope) -> bytes:
        data = pack(envelope)
        if len(data) > self.max_payload:  # nats-py would raise too, but after building the command
            raise MessageTooLargeError(
                f"envelope of {len(data)} bytes is over the {self.max_payload}-byte NATS payload limit",
                details={"size": len(data), "limit": self.max_payload},
            )
        return data

    async def subscribe(
        self, subject: str, callback: DeliveryCallback, *, queue: str | None = None
    ) -> _Subscription:
        """Call ``callback`` for every envelope on ``subject``; with ``queue``, one group member each."""
        nc = self._check()[0]

        async def on_msg(msg: Msg) -> None:
            reply = self._replier(msg.reply) if msg.reply else None
            try:
                envelope = unpack(msg.data)
            except MessageValidationError as exc:
                logger.warning("dropped a message on %s: %s", msg.subject, exc)
                if reply is not None:  # tell the sender at once rather than let it time out
                    await reply(encode_error(exc, node_id=""))
                return
            try:  # the callback starts a task: awaiting a handler here would serialize the subject
                callback(Delivery(envelope, reply))
            except Exception:
                logger.exception("delivery callback for %s failed", msg.subject)

        with _NatsErrors(f"subscribe {subject}"):
            sub = await nc.subscribe(
                self._prefix + subject,
                queue=queue or "",
                cb=on_msg,
                pending_msgs_limit=_PENDING_MSGS,
                pending_bytes_limit=_PENDING_BYTES,
            )
            await _sync(nc)  # now a request from any connection to this server finds the subscriber
        subscription = _Subscription(sub, nc, self)
        self._subscriptions.add(subscription)
        return subscription

    def _replier(self, inbox: str) -> Reply:
        async def reply(envelope: Envelope) -> None:
            await self._send(inbox, envelope)

        return reply

    async def _send(self, subject: str, envelope: Envelope, reply: str = "") -> None:
        nc = self._check()[0]
        data = self._frame(envelope)
        with _NatsErrors(subject):
            await nc.publish(subject, data, reply=reply)

    async def publish(self, subject: str, envelope: Envelope) -> None:
        """Send to every subscriber of ``subject``; NATS does not say how many, so this returns None."""
        await self._send(self._prefix + subject, envelope)

    async def request(self, subject: str, envelope: Envelope, *, timeout: float) -> Envelope:
        """Send to one subscriber of ``subject`` and return its reply.

        Raises:
            NoResponderError: nobody listens on ``subject`` (NATS says so in well under a millisecond).
            RequestTimeoutError: no reply within ``timeout`` seconds.
            MessageTooLargeError: the envelope is over ``max_payload``; nothing was sent.
            TransportError: the connection is down or failed.
        """
        nc = self._check()[0]
        data = self._frame(envelope)
        # Not nc.request(): it starts a task per request (asyncio.wait_for) and costs about as much
        # again as the round trip. One inbox subscription, a dict of futures and a timer instead.
        token = str(next(self._tokens))
        reply: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._pending[token] = reply
        timer = asyncio.get_running_loop().call_later(timeout, _expire, reply)
        try:
            with _NatsErrors(subject, timeout):
                await nc.publish(self._prefix + subject, data, reply=self._inbox + token)
                msg = await reply
        finally:
            timer.cancel()
            del self._pending[token]
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
            raise NoResponderError(f"nobody listens on {subject}")
        try:
            return unpack(msg.data)
        except MessageValidationError as exc:
            raise TransportError(f"unreadable reply on {subject}: {exc}") from exc

    async def _on_reply(self, msg: Msg) -> None:
        reply = self._pending.get(msg.subject[len(self._inbox) :])
        if reply is not None and not reply.done():
            reply.set_result(msg)
