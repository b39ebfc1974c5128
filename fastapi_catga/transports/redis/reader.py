"""`ChannelReader`: the subscriber connection, read by one task.

It holds every subscription and PINGs when idle, to notice a frozen server. When the connection
breaks it calls ``on_lost``, reconnects, subscribes every channel again and calls ``on_back``.
(UN)SUBSCRIBE commands are written by the tasks that ask for them and confirmed by the reader.
On a Redis Cluster of 7.0 or later the commands are the sharded ones (``SSUBSCRIBE``...); a
``sunsubscribe`` nobody asked for means the slot moved: the reader reconnects, to its new owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Any, Literal

from redis.asyncio import BlockingConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError

from fastapi_catga.exceptions import TransportError
from fastapi_catga.transports._shared import fail
from fastapi_catga.transports.redis.connections import reopen
from fastapi_catga.transports.redis.errors import BROKER_ERRORS, connect_failure, reason
from fastapi_catga.transports.redis.locate import LocatedConnection, PubSubCommands, located

__all__ = ["RECONNECT_DELAYS", "ChannelReader"]

logger = logging.getLogger(__name__)

#: Pauses between reconnect attempts; the last one repeats, so a returning server is seen within ~0.5 s.
RECONNECT_DELAYS = (0.05, 0.1, 0.2, 0.5)

# The replies of sharded pub/sub, as their plain kinds.
_KINDS = {b"ssubscribe": b"subscribe", b"sunsubscribe": b"unsubscribe", b"smessage": b"message"}


class ChannelReader:
    """Reads the subscriber connection from the task running `run`; see the module docstring.

    Args:
        connection: a connection of its own, in RESP2 (pub/sub messages are plain arrays).
        pool: the pool of the transport's other commands, reset after each reconnect.
        where: the server, for messages (no password).
        timeout: the bound on (re)connecting and subscribing.
        idle: seconds without a message before a PING, and then before the connection counts as lost.
        channels: every channel to subscribe, asked at each (re)connect.
        on_message: called with the channel and data of each message, on the reader's task.
        on_lost: called when the connection broke, before reconnecting.
        on_back: called once reconnected with every channel subscribed.
        commands: plain or sharded pub/sub.
    """

    def __init__(
        self,
        connection: AbstractConnection,
        pool: BlockingConnectionPool,
        *,
        where: str,
        timeout: float,
        idle: float,
        channels: Callable[[], Iterable[bytes]],
        on_message: Callable[[bytes, bytes], None],
        on_lost: Callable[[], None],
        on_back: Callable[[], None],
        commands: PubSubCommands | None = None,
    ) -> None:
        self._connection = connection
        self._pool = pool
        self._where = where
        self._timeout = timeout
        self._idle = idle
        self._channels = channels
        self._on_message = on_message
        self._on_lost = on_lost
        self._on_back = on_back
        self._commands = commands or PubSubCommands(None)
        self._relocate = False
        self._confirming: dict[tuple[bytes, bytes], asyncio.Future[None]] = {}  # (b"subscribe", channel)

    async def open(self) -> None:
        """(Re)open the connection and subscribe every channel; read inline until Redis confirmed them."""
        connection = self._connection
        await reopen(connection)
        channels = list(self._channels())
        await connection.send_command(self._commands.name("SUBSCRIBE"), *channels, check_health=False)
        unconfirmed = len(channels)
        while unconfirmed:
            response = await connection.read_response()
            unconfirmed -= _KINDS.get(response[0], response[0]) == b"subscribe"
            self._handle(response)

    async def confirmed(self, command: Literal["SUBSCRIBE", "UNSUBSCRIBE"], channel: bytes) -> None:
        """Send (UN)SUBSCRIBE for one channel; return once the reader saw Redis confirm it."""
        if not self._connection.is_connected:  # never let send_command reconnect behind the reader's back
            raise TransportError(f"the subscriber connection to {self._where} is down")
        done = self._confirming[(command.lower().encode(), channel)] = (
            asyncio.get_running_loop().create_future()
        )
        await self._connection.send_command(self._commands.name(command), channel, check_health=False)
        await done

    @property
    def connection(self) -> AbstractConnection:
        """The subscriber connection (the reader task owns it: read only its address)."""
        return self._connection

    def fail_confirmations(self, error: TransportError) -> None:
        """Fail every (UN)SUBSCRIBE still waiting for its confirmation."""
        for done in self._confirming.values():
            fail(done, error)
        self._confirming.clear()

    async def relocate(self) -> None:
        """A command was answered ``MOVED`` or ``READONLY``, or the locator names another server now:
        reconnect, to where the locator says, unless this connection is there already (the error
        came late, from a connection to the old server).

        The reader checks after each read; a PING makes that read come now, not after the idle wait.
        """
        connection = self._connection
        if not connection.is_connected:
            return  # reconnecting already, which locates anew
        with contextlib.suppress(*BROKER_ERRORS):  # a broken connection is noticed by the reader
            async with asyncio.timeout(self._timeout):
                if isinstance(connection, LocatedConnection):
                    address = await connection.locator.locate(connection)
                    connection.locator.noted(address)
                    if address == (connection.host, connection.port):
                        return
                self._relocate = True
                await connection.send_command("PING", check_health=False)

    async def aclose(self) -> None:
        """Close the connection (once `run` has ended)."""
        await self._connection.disconnect()

    async def run(self) -> None:
        """Read until cancelled; a broken connection is reported, then reconnected."""
        while True:
            try:
                await self._receive()
            except Exception as exc:  # the reader outlives anything: each ending counts as a lost connection
                unexpected = not isinstance(exc, BROKER_ERRORS)
                logger.warning(
                    "lost the Redis connection to %s (%s)", self._where, reason(exc), exc_info=unexpected
                )
            self._on_lost()
            await self._reconnect()
            self._on_back()

    async def _receive(self) -> None:
        """Hand over messages until the connection breaks; PING when idle to notice a frozen server.

        A read has no timer of its own (a timer per message cost a tenth of a Redis round trip):
        `_IdleWatch` ends the read once ``idle`` seconds passed with nothing received.
        """
        connection, loop = self._connection, asyncio.get_running_loop()
        pinged = False
        while True:
            try:
                async with asyncio.timeout(None) as idle:
                    watch = _IdleWatch(loop, self._idle, idle)
                    try:
                        while True:
                            # Not disconnected when the watch ends the read: nothing was sent to be
                            # answered but the PING, and a read cut short leaves the rest buffered.
                            response = await connection.read_response(disconnect_on_error=False)
                            watch.received += 1
                            pinged = False
                            if self._relocate:
                                self._relocate = False
                                raise RedisConnectionError(
                                    "the server no longer takes this cluster's writes (moved or demoted)"
                                )
                            self._handle(response)
                    finally:
                        watch.stop()
            except TimeoutError:  # ``idle`` seconds and nothing came
                if pinged:
                    raise RedisConnectionError(f"no answer to PING within {self._idle} s") from None
                await connection.send_command("PING", check_health=False)
                pinged = True

    async def _reconnect(self) -> None:
        said = ""  # the last reason a reconnect failed for: a new one (refused credentials after a
        # password change, say) is a warning, the same one again only a debug line
        for attempt in itertools.count():
            await asyncio.sleep(RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)])
            try:
                async with asyncio.timeout(self._timeout):
                    await self.open()
                    # The pooled sockets most likely died with the server: make the next command reconnect.
                    await self._pool.disconnect(inuse_connections=False)
            except BROKER_ERRORS as exc:
                why = connect_failure(exc, tls=False)  # refused credentials say what to check
                level = logging.DEBUG if why == said else logging.WARNING
                logger.log(level, "reconnecting to Redis at %s failed: %s", self._where, why)
                said = why
            else:
                logger.info(
                    "reconnected to Redis at %s%s after %d attempt(s)",
                    self._where,
                    located(self._connection),
                    attempt + 1,
                )
                return

    def _handle(self, response: Any) -> None:
        match response:
            case [bytes() as kind, channel, data] if _KINDS.get(kind, kind) == b"message":
                self._on_message(channel, data)
            case [b"subscribe" | b"unsubscribe" | b"ssubscribe" | b"sunsubscribe" as kind, channel, _]:
                done = self._confirming.pop((_KINDS.get(kind, kind), channel), None)
                if done is None and kind == b"sunsubscribe":  # Redis dropped it: the slot moved
                    raise RedisConnectionError(f"Redis dropped the shard channel {channel!r}: the slot moved")
                if done and not done.done():
                    done.set_result(None)


class _IdleWatch:
    """Ends the reader's read through its ``timeout`` once ``interval`` seconds passed with
    `received` unchanged: one timer per quarter interval, whatever the number of messages."""

    __slots__ = ("_handle", "_idle_at", "_interval", "_loop", "_seen", "_timeout", "received")

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float, timeout: asyncio.Timeout) -> None:
        self.received = 0  # the reader counts each message here: one attribute write per message
        self._loop = loop
        self._interval = interval
        self._timeout = timeout
        self._seen = 0
        self._idle_at = loop.time() + interval
        self._handle = loop.call_later(interval / 4, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        if self.received != self._seen:  # within a quarter interval of the last message
            self._seen, self._idle_at = self.received, now + self._interval
        elif now >= self._idle_at:
            self._timeout.reschedule(now)  # the read ends with TimeoutError in the reader's task
            return
        self._handle = self._loop.call_at(min(now + self._interval / 4, self._idle_at), self._check)

    def stop(self) -> None:
        self._handle.cancel()
