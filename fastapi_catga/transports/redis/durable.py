"""`RedisDurable`: the durable store on Redis Streams (6.2 and later; no 8.x command is used).

Keys, all under the hash tag ``{<cluster>}`` (one slot: Lua may touch them together):

- ``catga:{c}:dur:cmd:<type>``: a command stream, read by the group ``workers``, created at ``0``
  (everything already queued); an entry is deleted when acked or dropped, so nothing trims it.
- ``catga:{c}:dur:evt:<type>``: an event stream, a group per handler, created at ``$`` (events
  from now on). Entries are shared by the groups, so none is deleted on ack: each XADD trims the
  stream by age (``MINID ~`` now - retention), never by length, which would drop unread entries
  at any age; an event no group read within the retention is gone (pending ones are acked away).
- ``catga:{c}:dur:hold:<kind>:<type>:<group>``: entries handed back for longer than the lease.
- ``catga:{c}:dur:lease:<key>``, ``catga:{c}:dur:done:<key>``: leases and done records, PX TTLs.
- ``catga:{c}:dur:dlq`` (hash: id -> record) and ``catga:{c}:dur:dlq:order`` (ids by time added).

Type and group names are percent-encoded in keys (``%``, ``:``, ``{`` and ``}`` cannot clash).
The Lua scripts are in `durable_scripts`; reading is in `durable_consumer`.

Redis keeps what the AOF keeps: with ``appendonly no`` (its default) a restart loses every queue
since the last RDB snapshot, which `prepare` warns about once.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol
from urllib.parse import quote

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import ResponseError

from fastapi_catga.core.envelope import Envelope, pack, unpack
from fastapi_catga.exceptions import TransportError
from fastapi_catga.transports._shared import frame
from fastapi_catga.transports.durable import DeadLetter, Queue, QueueKind, Stored
from fastapi_catga.transports.redis import durable_scripts as scripts
from fastapi_catga.transports.redis.connections import once_pool, private_connection
from fastapi_catga.transports.redis.durable_consumer import RedisDurableConsumer

__all__ = ["Command", "RedisDurable"]

logger = logging.getLogger(__name__)


class Command(Protocol):
    """Runs one command: checks the connection, bounds the block by the command timeout (plus
    ``extra`` seconds: a blocking read), translates errors."""

    def __call__(self, what: str, extra: float = 0.0) -> AbstractAsyncContextManager[None]: ...


_FIELD = "m"  # a stream entry's one field: the envelope as `pack` frames it
_DEFAULT_RETENTION = 14 * 86400.0


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _safe(name: str) -> str:
    return quote(name, safe="._-")


class RedisDurable:
    """The `DurableStore` of one `RedisTransport`: see the module docstring.

    Args:
        pool: the transport's command pool: its server and options, for the pools made here.
        cluster: namespaces every key.
        command: the transport's guard around each command.
        max_payload: the largest envelope appended, in bytes.
        max_connections: the size of this store's pool (commands that are never retried).
        timeout: the command timeout, also the bound on taking a connection from the pool.
    """

    def __init__(
        self,
        pool: BlockingConnectionPool,
        cluster: str,
        command: Command,
        *,
        max_payload: int,
        max_connections: int,
        timeout: float,
    ) -> None:
        self._pool = pool
        self._once = once_pool(pool, max_connections=max_connections, timeout=timeout)
        self._redis = redis = Redis(connection_pool=self._once)
        self._command = command
        #: Counts the times the server went away; a connection opened before the last is dead.
        self.generation = 0
        self._pool_generation = 0
        self._max_payload = max_payload
        self._prefix = f"catga:{{{cluster}}}:dur:"
        self._retention = _DEFAULT_RETENTION
        self._warned = False
        self._consumers: set[RedisDurableConsumer] = set()
        self.reclaim = redis.register_script(scripts.RECLAIM)
        self.settle = redis.register_script(scripts.SETTLE)
        self.touch = redis.register_script(scripts.TOUCH)
        self._claim = redis.register_script(scripts.CLAIM)
        self._take = redis.register_script(scripts.TAKE)
        self._renew = redis.register_script(scripts.RENEW)
        self._release = redis.register_script(scripts.RELEASE)
        self._commit = redis.register_script(scripts.COMMIT)
        self._keep_letter = redis.register_script(scripts.KEEP_DEAD_LETTER)
        self._list_letters = redis.register_script(scripts.DEAD_LETTERS)
        self._remove_letter = redis.register_script(scripts.REMOVE_DEAD_LETTER)

    def mark_stale(self) -> None:
        """The server went away: every open connection is dead; reopen them before the next command.

        Not retrying commands makes this matter: redis-py does not always see that a pooled
        connection died with the server, and its next command would fail once."""
        self.generation += 1

    @contextlib.asynccontextmanager
    async def command(self, what: str, extra: float = 0.0) -> AsyncIterator[None]:
        """The transport's guard around each command (see `Command`), after closing idle pooled
        connections that the server's going away left dead."""
        async with self._command(what, extra):
            if self._pool_generation != self.generation:
                self._pool_generation = self.generation
                await self._once.disconnect(inuse_connections=False)
            yield

    # -- keys -----------------------------------------------------------------------------------------

    def stream(self, kind: QueueKind, type_name: str) -> str:
        return f"{self._prefix}{kind}:{_safe(type_name)}"

    def hold(self, queue: Queue) -> str:
        return f"{self._prefix}hold:{queue.kind}:{_safe(queue.type_name)}:{_safe(queue.group)}"

    def _letter_keys(self) -> list[str]:
        return [f"{self._prefix}dlq", f"{self._prefix}dlq:order"]

    # -- queues ---------------------------------------------------------------------------------------

    async def prepare(
        self, queues: Sequence[Queue], *, lease: float, dedup_window: float, retention: float
    ) -> None:
        """Create each queue's stream and group (a group that exists keeps its place); warn once
        when Redis would lose them on a restart."""
        self._retention = retention
        for queue in queues:
            await self.create_group(queue, "0" if queue.kind == "cmd" else "$")
        await self._warn_about_persistence()

    async def create_group(self, queue: Queue, start: str) -> None:
        """``XGROUP CREATE … MKSTREAM`` at ``start``; a group that exists already is left as it is."""
        async with self.command(f"XGROUP CREATE {queue.group}"):
            try:
                await self._redis.xgroup_create(
                    self.stream(queue.kind, queue.type_name), queue.group, id=start, mkstream=True
                )
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _warn_about_persistence(self) -> None:
        if self._warned:
            return
        self._warned = True
        try:
            async with self.command("CONFIG GET"):
                appendonly = await self._config("appendonly")
                policy = await self._config("maxmemory-policy")
        except TransportError as exc:  # managed Redis may forbid CONFIG
            logger.debug("cannot read the Redis persistence settings: %s", exc)
            return
        if appendonly == "no":
            logger.warning(
                "Redis runs with appendonly no: a Redis restart loses the durable queues since its "
                "last snapshot; set appendonly yes (appendfsync everysec or always)"
            )
        if policy not in (None, "noeviction"):
            logger.warning(
                "Redis evicts keys (maxmemory-policy %s): an evicted queue loses its messages; "
                "set maxmemory-policy noeviction",
                policy,
            )

    async def _config(self, name: str) -> str | None:
        reply = await self._redis.config_get(name)
        for value in reply.values():
            return value.decode() if isinstance(value, bytes) else value
        return None

    async def append(self, kind: QueueKind, type_name: str, envelope: Envelope, *, dedup_id: str) -> Stored:
        """XADD on a connection redis-py never retries on: a repeat would append twice. Redis before
        8.6 has no idempotent XADD, so a repeated append is stored again: the done record absorbs it."""
        data = frame(envelope, self._max_payload, "Redis")
        minid = None if kind == "cmd" else str(max(0, int((time.time() - self._retention) * 1000)))
        async with self.command(f"XADD {type_name}"):
            await self._redis.xadd(
                self.stream(kind, type_name), {_FIELD: data}, minid=minid, approximate=True
            )
        return Stored(duplicate=False)

    def consumer(self, queue: Queue, *, consumer: str, lease: float) -> RedisDurableConsumer:
        """A reader of ``queue`` with a connection of its own (opened at its first fetch)."""
        reader = RedisDurableConsumer(
            self, queue, consumer, lease, private_connection(self._pool), self._consumers.discard
        )
        self._consumers.add(reader)
        return reader

    async def aclose(self) -> None:
        """Close every consumer's connection and this store's pool."""
        for reader in list(self._consumers):
            await reader.close()
        await self._once.aclose()

    # -- leases and done records ----------------------------------------------------------------------

    async def done(self, key: str) -> bytes | None:
        async with self.command("GET done"):
            record = await self._redis.get(self._prefix + "done:" + key)
        return record.encode() if isinstance(record, str) else record

    async def claim(self, key: str, holder: str, ttl: float) -> bool:
        async with self.command("lease claim"):
            return bool(await self._claim(keys=[self._lease(key)], args=[holder, _ms(ttl)]))

    async def take(self, key: str, holder: str, ttl: float) -> bytes | bool:
        keys = [self._lease(key), self._prefix + "done:" + key]
        async with self.command("lease take"):
            taken = await self._take(keys=keys, args=[holder, _ms(ttl)])
        if isinstance(taken, int):
            return bool(taken)
        return taken.encode() if isinstance(taken, str) else taken

    async def renew(self, key: str, holder: str, ttl: float) -> bool:
        async with self.command("lease renew"):
            return bool(await self._renew(keys=[self._lease(key)], args=[holder, _ms(ttl)]))

    async def release(self, key: str, holder: str) -> None:
        async with self.command("lease release"):
            await self._release(keys=[self._lease(key)], args=[holder])

    async def commit(self, key: str, holder: str, result: bytes, ttl: float) -> bool:
        """Lua: the lease is ``holder``'s and no record exists → write it, end the lease. Not
        retried by redis-py: a repeat would answer False for the first run's record."""
        keys = [self._lease(key), self._prefix + "done:" + key]
        async with self.command("commit"):
            return bool(await self._commit(keys=keys, args=[holder, result, _ms(ttl)]))

    def _lease(self, key: str) -> str:
        return self._prefix + "lease:" + key

    # -- dead letters ---------------------------------------------------------------------------------

    async def add_dead_letter(self, letter: DeadLetter, envelope: Envelope) -> bool:
        record = letter.model_dump_json().encode() + b"\n" + pack(envelope)
        async with self.command("dead letter add"):
            kept = await self._keep_letter(
                keys=self._letter_keys(), args=[_ms(self._retention), letter.id, record]
            )
        return bool(kept)

    async def dead_letters(self, limit: int) -> list[tuple[DeadLetter, Envelope]]:
        if limit < 1:
            return []
        async with self.command("dead letter list"):
            records: list[bytes] = await self._list_letters(
                keys=self._letter_keys(), args=[_ms(self._retention), limit]
            )
        return [_letter(record) for record in records]

    async def dead_letter(self, letter_id: str) -> tuple[DeadLetter, Envelope] | None:
        async with self.command("dead letter get"):
            record = await self._redis.hget(self._letter_keys()[0], letter_id)
        if record is None:
            return None
        return _letter(record.encode() if isinstance(record, str) else record)

    async def remove_dead_letter(self, letter_id: str) -> bool:
        async with self.command("dead letter remove"):
            return bool(await self._remove_letter(keys=self._letter_keys(), args=[letter_id]))


def _letter(record: bytes) -> tuple[DeadLetter, Envelope]:
    """A dead letter's record: its JSON line (JSON escapes newlines), then the framed envelope."""
    head, _, framed = record.partition(b"\n")
    return DeadLetter.model_validate_json(head), unpack(framed)
