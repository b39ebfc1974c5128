"""`RedisDurableConsumer`: one node's reader of one durable queue (a stream and a group).

A fetch first reclaims entries idle for a lease or more (Lua: XPENDING IDLE, then XCLAIM, which
counts the delivery), then reads new ones with ``XREADGROUP … >``. The blocking read runs on a
connection of its own without a socket timeout (a BLOCK longer than redis-py's ``socket_timeout``
fails: redis/redis-py#3138), bounded by the command timeout plus the block, and blocks at most
`RECLAIM_EVERY` before reclaiming again: entries handed back with a delay come out within that.

Redis keeps every delivery count in the group's pending entries list; this class counts nothing.
When the group is gone (``NOGROUP``: Redis restarted without persistence, was flushed, or evicted
the stream) it is created again at ``0``, after a backoff that grows while it keeps failing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ResponseError

from fastapi_catga.core.envelope import Envelope, unpack
from fastapi_catga.exceptions import MessageValidationError, TransportError
from fastapi_catga.transports.durable import DurableDelivery, Queue

if TYPE_CHECKING:
    from fastapi_catga.transports.redis.durable import RedisDurable

__all__ = ["RECLAIM_EVERY", "REGROUP_DELAYS", "RedisDelivery", "RedisDurableConsumer"]

logger = logging.getLogger(__name__)

#: The longest a read blocks before the next reclaim, in seconds.
RECLAIM_EVERY = 1.0
#: Pauses before each new attempt to create a lost group; the last one repeats.
REGROUP_DELAYS = (0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass(eq=False)
class RedisDelivery:
    """One delivery: a stream entry, and how often the group got it (from the PEL)."""

    consumer: RedisDurableConsumer
    entry_id: bytes
    envelope: Envelope
    deliveries: int

    async def ack(self) -> None:
        await self.consumer.settle(self.entry_id)

    async def drop(self) -> None:
        await self.consumer.settle(self.entry_id)

    async def retry(self, delay: float) -> None:
        """Make the entry idle so the reclaim takes it ``delay`` s from now: for a delay within the
        lease by setting its idle time (``XCLAIM … IDLE lease-delay JUSTID``, uncounted); beyond the
        lease also by holding it (the hold set), which the reclaim honours."""
        await self.consumer.touch(self, max(0.0, delay))

    async def keep_alive(self) -> None:
        """``XCLAIM … 0 id JUSTID``: idle time back to 0, uncounted, if this delivery still owns it."""
        await self.consumer.touch(self, None)


class RedisDurableConsumer:
    """Reads one queue for one group as the consumer ``name``; see the module docstring.

    Args:
        store: the store whose scripts and keys it uses.
        queue: the queue (stream) and group.
        name: this consumer's name in the group (the node id).
        lease: seconds before an unanswered delivery goes to another consumer.
        connection: a private connection for the blocking reads.
        forget: called with this consumer once it is closed.
    """

    def __init__(
        self,
        store: RedisDurable,
        queue: Queue,
        name: str,
        lease: float,
        connection: AbstractConnection,
        forget: Callable[[RedisDurableConsumer], None],
    ) -> None:
        self._store = store
        self._queue = queue
        self._name = name
        self._lease_ms = max(1, round(lease * 1000))
        self._connection = connection
        self._generation = store.generation  # the store's, when the connection was (re)opened
        self._forget = forget
        self._stream = store.stream(queue.kind, queue.type_name)
        self._keys = [self._stream, store.hold(queue)]
        self._lock = asyncio.Lock()
        self._closed = False
        self._failures = 0  # attempts at the lost group since the last read that worked
        self._regroup_at: float | None = None  # the group is lost: when to create it again

    async def fetch(self, limit: int, wait: float) -> list[DurableDelivery]:
        """Reclaimed entries first, then new ones; see `DurableConsumer.fetch`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, wait)
        async with self._lock:
            while not self._closed and limit > 0:
                if self._regroup_at is not None and not await self._regroup(deadline):
                    return []
                got: list[DurableDelivery] = []
                try:
                    got += await self._reclaim(limit)
                    if len(got) < limit:
                        block = 0.0 if got else min(deadline - loop.time(), RECLAIM_EVERY)
                        got += await self._read(limit - len(got), block)
                except TransportError as exc:
                    if got:  # reclaimed (and counted) already: theirs; the read fails again next time
                        return got
                    if not _nogroup(exc):
                        raise
                    self._lost_group(exc)
                    continue
                self._failures = 0
                if got or loop.time() >= deadline:
                    return got
        return []

    async def close(self) -> None:
        """Stop reading; what was fetched and not acked comes back after its lease."""
        self._closed = True
        self._forget(self)
        await self._connection.disconnect()

    # -- reading ------------------------------------------------------------------------------------

    async def _reclaim(self, limit: int) -> list[RedisDelivery]:
        args: list[str | int] = [self._queue.group, self._name, self._lease_ms, limit]
        async with self._store.command("XPENDING/XCLAIM (reclaim)"):
            claimed: list[list[Any]] = await self._store.reclaim(keys=self._keys, args=args)
        return [self._delivery(entry_id, fields, count) for entry_id, fields, count in claimed]

    async def _read(self, count: int, block: float) -> list[RedisDelivery]:
        command: list[str | int] = ["XREADGROUP", "GROUP", self._queue.group, self._name, "COUNT", count]
        if block >= 0.001:  # never BLOCK 0: that waits forever
            command += ["BLOCK", max(1, int(block * 1000))]
        connection = self._connection
        async with self._store.command("XREADGROUP", max(0.0, block)):
            if self._generation != self._store.generation:  # the server went away meanwhile
                self._generation = self._store.generation
                await connection.disconnect()
            try:
                await connection.send_command(*command, "STREAMS", self._stream, ">", check_health=False)
                reply = await connection.read_response()
            except ResponseError:
                raise  # an error reply: the connection is fine
            except BaseException:
                await connection.disconnect(nowait=True)  # a reply may still come: never read it
                raise
        if not reply:
            return []
        [[_, entries]] = reply
        return [self._delivery(entry_id, fields, 1) for entry_id, fields in entries]

    def _delivery(self, entry_id: bytes, fields: list[bytes] | None, deliveries: int) -> RedisDelivery:
        data = dict(zip(fields[::2], fields[1::2], strict=True)).get(b"m", b"") if fields else b""
        try:
            envelope = unpack(data)
        except MessageValidationError:  # not written by a catga node: handed on, to be dead-lettered
            envelope = Envelope({}, data)
        return RedisDelivery(self, entry_id, envelope, deliveries)

    # -- a lost group -------------------------------------------------------------------------------

    def _lost_group(self, exc: TransportError) -> None:
        if self._failures == 0:
            logger.error(
                "durable queue %s lost its group %s (Redis restarted without persistence, was flushed "
                "or evicted the stream): creating it again; messages queued before are gone (%s)",
                self._stream,
                self._queue.group,
                exc,
            )
        delay = REGROUP_DELAYS[min(self._failures, len(REGROUP_DELAYS) - 1)]
        self._failures += 1
        self._regroup_at = asyncio.get_running_loop().time() + delay

    async def _regroup(self, deadline: float) -> bool:
        """Create the lost group once its pause is over; False: not within this fetch."""
        loop = asyncio.get_running_loop()
        due = self._regroup_at or 0.0
        await asyncio.sleep(max(0.0, min(due, deadline) - loop.time()))
        if loop.time() < due:
            return False
        try:
            # At 0 for events too: a new group would start at the end, but this one existed, and
            # what was appended since the loss is what it has not read yet.
            await self._store.create_group(self._queue, "0")
        except TransportError as exc:
            self._lost_group(exc)
            raise
        self._regroup_at = None
        return True

    # -- settling -----------------------------------------------------------------------------------

    async def settle(self, entry_id: bytes) -> None:
        """Ack: XACK, and for commands XDEL (one group reads them), in one script."""
        delete = "1" if self._queue.kind == "cmd" else "0"
        async with self._store.command("XACK"):
            await self._store.settle(keys=self._keys, args=[self._queue.group, entry_id, delete])

    async def touch(self, delivery: RedisDelivery, delay: float | None) -> None:
        """Keep alive (``delay`` None) or hand back for ``delay`` s; only while it is ours."""
        if delay is None:
            idle_ms, hold_ms = 0, 0
        else:
            delay_ms = round(delay * 1000)
            idle_ms = max(0, self._lease_ms - delay_ms)
            hold_ms = delay_ms if delay_ms > self._lease_ms else 0
        args: list[str | bytes | int] = [
            *(self._queue.group, self._name, delivery.entry_id),
            *(delivery.deliveries, idle_ms, hold_ms),
        ]
        async with self._store.command("XCLAIM JUSTID"):
            await self._store.touch(keys=self._keys, args=args)


def _nogroup(exc: TransportError) -> bool:
    cause = exc.__cause__
    return isinstance(cause, ResponseError) and "NOGROUP" in str(cause)
