"""`PublishWriter`: every PUBLISH of one transport, auto-pipelined over one private connection.

Callers queue a PUBLISH and wait for its count. One task sends everything queued since its last
batch in one write, then reads the counts in order: ~2.5x the rate of awaiting each PUBLISH. A
PUBLISH is never repeated: when a batch fails, each of its callers gets a `TransportError`.
"""

from __future__ import annotations

import asyncio

from redis.asyncio.connection import AbstractConnection

from fastapi_catga.exceptions import TransportError
from fastapi_catga.transports._shared import fail
from fastapi_catga.transports.redis.errors import reason
from fastapi_catga.transports.redis.locate import PubSubCommands, outdated

__all__ = ["PublishWriter"]

_Publish = tuple[str, bytes, asyncio.Future[int]]  # channel, data, the caller waiting for the count


class PublishWriter:
    """Sends the PUBLISHes of any number of callers in batches, from the task running `run`.

    Args:
        connection: a connection of its own; only the writer task uses it.
        where: the server, for error messages (no password).
        timeout: the bound on one batch; past it, the whole batch fails.
        commands: plain or sharded pub/sub (``SPUBLISH`` on a Redis Cluster of 7.0 or later).
    """

    def __init__(
        self,
        connection: AbstractConnection,
        *,
        where: str,
        timeout: float,
        commands: PubSubCommands | None = None,
    ) -> None:
        self._connection = connection
        self._commands = commands or PubSubCommands(None)
        self._where = where
        self._timeout = timeout
        self._outbox: list[_Publish] = []  # PUBLISHes for the next batch
        self._sending: list[_Publish] = []  # the batch in flight
        self._wake = asyncio.Event()
        self._stale = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def mark_stale(self) -> None:
        """The server went away: the connection's socket is dead; open a new one for the next batch."""
        self._stale = True

    async def publish(self, channel: str, data: bytes) -> int:
        """Queue a PUBLISH; return how many subscribers Redis handed it to.

        Raises:
            TransportError: its batch failed (it was not sent again), or the writer was closed.
        """
        return await self.enqueue(channel, data)  # bounded: the writer gives up on a batch after the timeout

    @property
    def queued(self) -> int:
        """PUBLISHes queued or in flight."""
        return len(self._outbox) + len(self._sending)

    def enqueue(self, channel: str, data: bytes) -> asyncio.Future[int]:
        """Queue a PUBLISH; the future gets its receiver count. A caller with a deadline of its own
        may fail the future first: the writer then drops the count."""
        loop = self._loop
        if loop is None:  # the writer's connection is tied to it for good
            loop = self._loop = asyncio.get_running_loop()  # a getpid() call each time on 3.11
        future: asyncio.Future[int] = loop.create_future()
        self._outbox.append((channel, data, future))
        self._wake.set()
        return future

    async def run(self) -> None:
        """Send batch after batch, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._outbox:
                self._sending, self._outbox = self._outbox, []
                await self._write(self._sending)
                self._sending = []  # answered: `queued` counts it no more

    async def drain(self, timeout: float) -> None:
        """Wait until what is queued or in flight now is sent and counted, or failed, for at most
        ``timeout`` seconds (a frozen server holds it that long)."""
        pending = [future for _, _, future in (*self._sending, *self._outbox)]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    async def aclose(self, error: TransportError) -> None:
        """Fail what is queued or in flight with ``error`` and close the connection (after `run` ended)."""
        for _, _, future in [*self._sending, *self._outbox]:
            fail(future, error)
        await self._connection.disconnect()

    async def _write(self, batch: list[_Publish]) -> None:
        """Send one batch of PUBLISHes in one write, then read their counts in order."""
        connection = self._connection
        try:
            # The server went away since the last batch (that socket is dead), or moved (a failover).
            if self._stale or outdated(connection):
                self._stale = False
                await connection.disconnect()
            async with asyncio.timeout(self._timeout):
                packed = _packed(self._commands.name("PUBLISH"), batch)
                await connection.send_packed_command(packed, check_health=False)
                counts = [await connection.read_response() for _ in batch]
        except Exception as exc:  # whatever it was, each caller gets a TransportError; the writer lives on
            await connection.disconnect()
            error = TransportError(f"PUBLISH to Redis at {self._where} failed: {reason(exc)}")
            for _, _, future in batch:
                fail(future, error)
            return
        for (_, _, future), count in zip(batch, counts, strict=True):
            if not future.done():
                future.set_result(count)


def _packed(command: str, batch: list[_Publish]) -> list[bytes]:
    """The batch as RESP arrays of bulk strings, ``<command> <channel> <data>`` each: what redis-py's
    ``pack_commands`` writes, at a fifth of its cost (it was the writer's largest step)."""
    name = command.encode()
    head = b"*3\r\n$%d\r\n%s\r\n" % (len(name), name)
    pieces: list[bytes] = []
    for channel, data, _ in batch:
        encoded = channel.encode()
        pieces += (b"%s$%d\r\n%s\r\n$%d\r\n" % (head, len(encoded), encoded, len(data)), data, b"\r\n")
    return pieces
