"""The Redis transport: pub/sub for messages; a TTL key per node plus a sorted set for membership.

Subjects map to channels ``catga:<cluster>:<subject>``. Pub/sub has no headers, so a message is one JSON
line (headers; for a request also the requester's reply channel and a correlation id), a newline, the body.
``PUBLISH`` answering 0 means nobody listens: `NoResponderError` at once.

Two private connections carry the messaging, each owned by one task. The reader holds every
subscription, PINGs when idle, and on a broken connection tells the listeners False, reconnects,
subscribes everything again and tells them True. The writer sends every ``PUBLISH`` queued since its last
batch in one round trip (an auto-pipeline: ~2.5x the rate of awaiting each one) and never repeats one.

Membership: ``catga:<cluster>:node:<id>`` holds a node's record (readable JSON) with a PX TTL; the sorted
set ``catga:<cluster>:members`` indexes them (score: the record's expiry in Redis server time); Lua
scripts change both and announce it on ``catga:<cluster>:members:events``. Keyspace notifications are
not used: they can come tens of seconds late.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi_catga.core.envelope import DEFAULT_MAX_PAYLOAD, Envelope, pack, unpack
from fastapi_catga.exceptions import (
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
)

try:
    from redis.asyncio import BlockingConnectionPool, Redis
    from redis.asyncio.connection import AbstractConnection
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff, NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
except ImportError as e:  # pragma: no cover - exercised by a test that hides redis
    if e.name is None or e.name.partition(".")[0] != "redis":
        raise
    raise ImportError('Redis transport needs redis-py: pip install "fastapi-catga[redis]"') from e

__all__ = ["RedisTransport"]

log = logging.getLogger(__name__)

#: Pauses between reconnect attempts; the last one repeats, so a returning server is seen within ~0.5 s.
RECONNECT_DELAYS = (0.05, 0.1, 0.2, 0.5)

# KEYS: record key, index. ARGV: node id, ttl ms, record, events channel, notice.
_PUT = """
local now = redis.call('TIME')
local expires = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[2])
redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], expires, ARGV[1])
redis.call('PUBLISH', ARGV[4], ARGV[5])
"""
# KEYS: record key, index. ARGV: node id, events channel, notice.
_DELETE = """
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
"""
# KEYS: index. ARGV: record key prefix. Returns id, record, id, record... and prunes what expired.
_LIST = """
local now = redis.call('TIME')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
local found = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local record = redis.call('GET', ARGV[1] .. id)
  if record then
    table.insert(found, id)
    table.insert(found, record)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return found
"""


# Request frames carry where to answer and which request of the requester's it is.
_REPLY_TO = "catga-reply-to"
_CORR = "catga-corr"


def _with_route(envelope: Envelope, reply_to: str | None = None, corr: str | None = None) -> Envelope:
    headers = dict(envelope.headers)
    if reply_to is not None:
        headers[_REPLY_TO] = reply_to
    if corr is not None:
        headers[_CORR] = corr
    return Envelope(headers, envelope.body)


def _route(envelope: Envelope) -> tuple[str | None, str | None]:
    """Take the reply channel and the correlation id out of a received frame's headers."""
    reply_to, corr = envelope.headers.pop(_REPLY_TO, None), envelope.headers.pop(_CORR, None)
    return (reply_to if isinstance(reply_to, str) else None), (corr if isinstance(corr, str) else None)


def _fail(future: asyncio.Future[Any], exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


@dataclass(eq=False)
class _Subscription:
    transport: RedisTransport
    channel: bytes
    callback: DeliveryCallback

    async def unsubscribe(self) -> None:
        await self.transport._unsubscribe(self.channel, self.callback)


class _Watch:
    """Membership events from the events channel; ends on `stop` and when the connection breaks."""

    def __init__(self, watches: set[_Watch]) -> None:
        self._watches = watches
        self.queue: asyncio.Queue[MemberEvent | None] = asyncio.Queue()

    async def __aiter__(self) -> AsyncIterator[MemberEvent]:
        while (event := await self.queue.get()) is not None:
            yield event
        self.queue.put_nowait(None)  # a later iteration ends at once too

    async def stop(self) -> None:
        self._watches.discard(self)
        self.queue.put_nowait(None)


class _Members:
    """The membership store: see the module docstring."""

    def __init__(self, transport: RedisTransport) -> None:
        self._transport = transport
        self._prefix = f"catga:{transport.cluster}:node:"
        self._index = f"catga:{transport.cluster}:members"
        self._put = transport._redis.register_script(_PUT)
        self._delete = transport._redis.register_script(_DELETE)
        self._list = transport._redis.register_script(_LIST)

    async def prepare(self, ttl: float) -> None:
        async with self._transport._command("PING"):
            await self._transport._redis.ping()

    async def put(self, node_id: str, value: bytes, ttl: float) -> None:
        notice = pack(Envelope({"kind": "put", "node": node_id}, value))
        ttl_ms = max(1, round(ttl * 1000))
        async with self._transport._command("member put"):
            await self._put(
                keys=[self._prefix + node_id, self._index],
                args=[node_id, ttl_ms, value, self._transport._events, notice],
            )

    async def delete(self, node_id: str) -> None:
        notice = pack(Envelope({"kind": "delete", "node": node_id}))
        async with self._transport._command("member delete"):
            await self._delete(
                keys=[self._prefix + node_id, self._index], args=[node_id, self._transport._events, notice]
            )

    async def list(self) -> dict[str, bytes]:
        async with self._transport._command("member list"):
            found: list[bytes] = await self._list(keys=[self._index], args=[self._prefix])
        return {node_id.decode(): record for node_id, record in zip(found[::2], found[1::2], strict=True)}

    async def watch(self) -> _Watch:
        self._transport._check()
        watch = _Watch(self._transport._watches)
        self._transport._watches.add(watch)
        return watch


class RedisTransport:
    """Messaging and membership over one Redis server (redis-py asyncio; install ``fastapi-catga[redis]``).

    Redis pub/sub has no queue groups: every subscriber of a channel gets every message, so the cluster
    layer picks a node by its own view and sends to that node's direct subject.

    Args:
        url: a ``redis://`` (or ``rediss://``, ``unix://``) URL; its password never shows in messages.
        cluster: namespaces every channel and key, so clusters can share one server.
        max_payload: the largest envelope sent, in bytes; a larger one is refused before sending.
        connect_timeout: the bound on connecting, and on every single command (nested retries in
            redis-py multiply otherwise).
        health_check_interval: the subscriber connection is PINGed after this many idle seconds, and
            declared lost when the PING gets no answer within as many more (a frozen server).
        max_connections: the pool for membership commands; callers wait for a free connection.
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
    ) -> None:
        self.url = url
        self.cluster = cluster
        self.max_payload = max_payload
        self._where = re.sub(r"//[^@/]*@", "//***@", url)
        self._timeout = connect_timeout
        self._idle = health_check_interval
        try:
            self._pool = BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=connect_timeout,
                socket_connect_timeout=connect_timeout,
                socket_timeout=connect_timeout,
                health_check_interval=health_check_interval,
                # Membership commands are safe to repeat: a few quick retries ride out a server restart.
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
                retry_on_error=[OSError],
            )
        except ValueError as exc:
            raise ConfigurationError(f"invalid Redis URL {self._where}: {exc}") from exc
        self._redis = Redis(connection_pool=self._pool)
        self._sub = self._private_connection()
        self._pub = self._private_connection()
        self._pub_stale = False
        prefix = f"catga:{cluster}:"
        self._prefix = prefix
        self._inbox = f"{prefix}reply.{uuid.uuid4().hex}"
        self._events = f"{prefix}members:events"
        self._internal: dict[bytes, Callable[[Envelope], None]] = {
            self._inbox.encode(): self._on_reply,
            self._events.encode(): self._on_member_notice,
        }
        self._handlers: dict[bytes, list[DeliveryCallback]] = {}
        self._confirming: dict[tuple[bytes, bytes], asyncio.Future[None]] = {}  # (b"subscribe", channel)
        self._pending: dict[str, asyncio.Future[Envelope]] = {}
        self._ids = itertools.count()
        self._outbox: list[tuple[str, bytes, asyncio.Future[int]]] = []  # PUBLISHes for the next batch
        self._sending: list[tuple[str, bytes, asyncio.Future[int]]] = []  # the batch in flight
        self._wake = asyncio.Event()
        self._watches: set[_Watch] = set()
        self._state = ConnectionState()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._members = _Members(self)

    def _private_connection(self) -> AbstractConnection:
        # RESP2 makes pub/sub messages plain arrays. No retries, socket timeout or health checks: the
        # owning task bounds every read, PINGs and reconnects by itself.
        kwargs = {
            **self._pool.connection_kwargs,
            "protocol": 2,
            "socket_timeout": None,
            "health_check_interval": 0,
        }
        kwargs.update(retry=Retry(NoBackoff(), 0), retry_on_error=[])
        return self._pool.connection_class(**kwargs)

    @property
    def connected(self) -> bool:
        """Whether the subscriber connection is up and every subscription is in place."""
        return self._state.up

    @property
    def members(self) -> _Members:
        """The membership store, namespaced by cluster."""
        return self._members

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        """Call ``listener(False)`` when the connection is lost and ``listener(True)`` once it is back."""
        self._state.add(listener)

    def _set_connected(self, connected: bool) -> None:
        self._state.tell(connected)

    def _check(self) -> None:
        if not self._state.up:
            state = "closed" if self._closed else "not connected, or reconnecting"
            raise TransportError(f"Redis transport for {self._where} is {state}")

    @contextlib.asynccontextmanager
    async def _command(self, what: str) -> AsyncIterator[None]:
        """Check the connection, bound the block by the command timeout, translate redis-py errors."""
        self._check()
        try:
            async with asyncio.timeout(self._timeout):
                yield
        except (RedisError, OSError, TimeoutError) as exc:
            if isinstance(exc, TransportError):
                raise
            raise TransportError(f"Redis at {self._where}: {what} failed: {_reason(exc)}") from exc

    async def connect(self) -> None:
        """Connect, subscribe the reply and membership channels, start the reader and writer tasks.

        Raises:
            TransportError: nothing answered at the URL within ``connect_timeout``.
        """
        if self._closed:
            raise TransportError("this Redis transport was closed; create a new one")
        if self._tasks:
            return
        try:
            async with asyncio.timeout(self._timeout):
                await self._subscribe_all()
        except (RedisError, OSError, TimeoutError) as exc:
            await self._sub.disconnect()
            raise TransportError(f"cannot connect to Redis at {self._where}: {_reason(exc)}") from exc
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_forever()), loop.create_task(self._write_forever())]
        self._set_connected(True)

    async def aclose(self) -> None:
        """Stop both tasks, fail what is in flight with `TransportError`, close every connection."""
        if self._closed:
            return
        self._closed = True
        self._state.up = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        error = TransportError(f"the Redis transport for {self._where} was closed")
        self._lost(error)
        for _, _, future in [*self._sending, *self._outbox]:
            _fail(future, error)
        for connection in (self._sub, self._pub):
            await connection.disconnect()
        await self._pool.aclose()

    # -- subscriptions: the reader task ------------------------------------------------------------

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
                    await self._confirmed("SUBSCRIBE", channel)
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
                await self._confirmed("UNSUBSCRIBE", channel)

    async def _confirmed(self, command: str, channel: bytes) -> None:
        """Send (UN)SUBSCRIBE for one channel; return once the reader saw Redis confirm it."""
        if not self._sub.is_connected:  # never let send_command reconnect behind the reader's back
            raise TransportError(f"the subscriber connection to {self._where} is down")
        done = self._confirming[(command.lower().encode(), channel)] = (
            asyncio.get_running_loop().create_future()
        )
        await self._sub.send_command(command, channel, check_health=False)
        await done

    async def _subscribe_all(self) -> None:
        """(Re)open the subscriber connection and subscribe every channel; read inline until confirmed."""
        await self._sub.disconnect()
        await self._sub.connect()  # type: ignore[no-untyped-call]
        channels = [*self._internal, *self._handlers]
        await self._sub.send_command("SUBSCRIBE", *channels, check_health=False)
        unconfirmed = len(channels)
        while unconfirmed:
            response = await self._sub.read_response()
            unconfirmed -= response[0] == b"subscribe"
            self._handle(response)

    async def _read_forever(self) -> None:
        while True:
            try:
                await self._receive()
            except Exception as exc:  # the reader outlives anything: each ending counts as a lost connection
                unexpected = not isinstance(exc, RedisError | OSError)
                log.warning(
                    "lost the Redis connection to %s (%s)", self._where, _reason(exc), exc_info=unexpected
                )
            self._pub_stale = True
            self._lost(TransportError(f"lost the connection to Redis at {self._where}"))
            await self._reconnect()
            self._set_connected(True)

    async def _receive(self) -> None:
        """Hand over messages until the connection breaks; PING when idle to notice a frozen server."""
        pinged = False
        while True:
            response = await self._sub.read_response(timeout=self._idle)
            if response is not None:
                pinged = False
                self._handle(response)
            elif pinged:
                raise RedisConnectionError(f"no answer to PING within {self._idle} s")
            else:
                await self._sub.send_command("PING", check_health=False)
                pinged = True

    async def _reconnect(self) -> None:
        for attempt in itertools.count():
            await asyncio.sleep(RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)])
            try:
                async with asyncio.timeout(self._timeout):
                    await self._subscribe_all()
                    # The pooled sockets most likely died with the server: make the next command reconnect.
                    await self._pool.disconnect(inuse_connections=False)
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("reconnecting to Redis at %s failed: %s", self._where, _reason(exc))
            else:
                log.info("reconnected to Redis at %s after %d attempt(s)", self._where, attempt + 1)
                return

    def _lost(self, error: TransportError) -> None:
        """Fail what waits on the subscriber connection, end the watches, tell the listeners."""
        waiting: list[asyncio.Future[Any]] = [*self._confirming.values(), *self._pending.values()]
        for future in waiting:
            _fail(future, error)
        self._confirming.clear()
        for watch in list(self._watches):
            watch.queue.put_nowait(None)
        self._watches.clear()
        self._set_connected(False)

    def _handle(self, response: Any) -> None:
        match response:
            case [b"message", channel, data]:
                self._on_message(channel, data)
            case [b"subscribe" | b"unsubscribe" as kind, channel, _]:
                if (done := self._confirming.pop((kind, channel), None)) and not done.done():
                    done.set_result(None)

    def _on_message(self, channel: bytes, data: bytes) -> None:
        try:
            envelope = unpack(data)
        except MessageValidationError as exc:
            log.warning("dropped an unreadable message on %s: %s", channel.decode(errors="replace"), exc)
            return
        internal = self._internal.get(channel)
        if internal is not None:
            internal(envelope)
            return
        reply_to, corr = _route(envelope)
        reply = None if reply_to is None else functools.partial(self._reply, reply_to, corr)
        for callback in self._handlers.get(channel, ()):
            try:
                callback(Delivery(envelope, reply))
            except Exception:
                log.exception("delivery callback for %s failed", channel.decode(errors="replace"))

    def _on_reply(self, envelope: Envelope) -> None:
        future = self._pending.get(_route(envelope)[1] or "")
        if future is not None and not future.done():
            future.set_result(envelope)

    def _on_member_notice(self, envelope: Envelope) -> None:
        kind, node_id = envelope.headers.get("kind"), envelope.headers.get("node")
        if not isinstance(node_id, str) or not node_id or kind not in ("put", "delete"):
            log.warning("dropped an unreadable membership notice: %s", envelope.headers)
            return
        body = envelope.body
        event = MemberEvent("put", node_id, body) if kind == "put" else MemberEvent("delete", node_id)
        for watch in self._watches:
            watch.queue.put_nowait(event)

    # -- publishing: the writer task -----------------------------------------------------------------

    async def publish(self, subject: str, envelope: Envelope) -> int:
        """Publish; returns how many subscribers Redis handed it to (0: nobody listens).

        Raises:
            MessageTooLargeError: over ``max_payload``; nothing was sent.
            TransportError: not connected, or the ``PUBLISH`` failed.
        """
        return await self._publish(self._prefix + subject, self._pack(envelope))

    async def request(self, subject: str, envelope: Envelope, *, timeout: float) -> Envelope:
        """Publish to ``subject`` with this transport's reply channel and wait up to ``timeout`` s.

        Raises:
            MessageTooLargeError: over ``max_payload``; nothing was sent.
            NoResponderError: ``PUBLISH`` reached nobody.
            RequestTimeoutError: no reply within ``timeout``.
            TransportError: not connected, or the connection failed meanwhile.
        """
        corr = str(next(self._ids))
        data = self._pack(_with_route(envelope, self._inbox, corr))
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Envelope] = loop.create_future()
        self._pending[corr] = reply
        # A timer rather than asyncio.timeout(): a third of the cost, on every request.
        timer = loop.call_later(
            timeout, _fail, reply, RequestTimeoutError(f"no reply on {subject} within {timeout:.3f} s")
        )
        try:
            if await self._publish(self._prefix + subject, data) == 0:
                raise NoResponderError(f"nobody listens on {subject} (PUBLISH reached 0)")
            return await reply
        finally:
            timer.cancel()
            del self._pending[corr]

    async def _reply(self, reply_to: str, corr: str | None, envelope: Envelope) -> None:
        if await self._publish(reply_to, self._pack(_with_route(envelope, corr=corr))) == 0:
            log.debug("the requester on %s is gone; reply dropped", reply_to)

    def _pack(self, envelope: Envelope) -> bytes:
        data = pack(envelope)
        if len(data) > self.max_payload:
            raise MessageTooLargeError(
                f"envelope of {len(data)} bytes is over the {self.max_payload}-byte limit; nothing was sent",
                details={"size": len(data), "limit": self.max_payload},
            )
        return data

    async def _publish(self, channel: str, data: bytes) -> int:
        self._check()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._outbox.append((channel, data, future))
        self._wake.set()
        return await future  # bounded: the writer gives up on every batch after the command timeout

    async def _write_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                self._sending, self._outbox = self._outbox, []
                await self._write(self._sending)

    async def _write(self, batch: list[tuple[str, bytes, asyncio.Future[int]]]) -> None:
        """Send one batch of PUBLISHes in one write, then read their counts in order."""
        try:
            if self._pub_stale:  # the server went away since the last batch: that socket is dead
                self._pub_stale = False
                await self._pub.disconnect()
            async with asyncio.timeout(self._timeout):
                commands = [("PUBLISH", channel, data) for channel, data, _ in batch]
                await self._pub.send_packed_command(self._pub.pack_commands(commands), check_health=False)
                counts = [await self._pub.read_response() for _ in batch]
        except Exception as exc:  # whatever it was, each caller gets a TransportError; the writer lives on
            await self._pub.disconnect()
            error = TransportError(f"PUBLISH to Redis at {self._where} failed: {_reason(exc)}")
            for _, _, future in batch:
                _fail(future, error)
            return
        for (_, _, future), count in zip(batch, counts, strict=True):
            if not future.done():
                future.set_result(count)
