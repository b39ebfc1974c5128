"""The Redis membership store: a TTL key per node, a sorted set to index them, Lua to keep both.

The scripts (`scripts`) change record and index together and announce each change on
``catga:{<cluster>}:members:events`` (with ``db<N>:`` before ``members`` on a database other than
0); the transport hands those notices to `RedisMembers.on_notice`,
which feeds the watches. Keyspace notifications are not used: they can come tens of seconds late.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from redis.asyncio import Redis

from fastapi_catga.core.envelope import Envelope, pack
from fastapi_catga.transports._shared import WatchQueue
from fastapi_catga.transports.base import MemberEvent
from fastapi_catga.transports.redis import scripts
from fastapi_catga.transports.redis.locate import PubSubCommands

__all__ = ["RedisMembers"]

logger = logging.getLogger(__name__)

#: Runs one command: checks the connection, bounds the block by the command timeout, translates errors.
Command = Callable[[str], AbstractAsyncContextManager[None]]


class _Watch(WatchQueue):
    """Membership events from the events channel; ends on `stop` and when the connection breaks."""

    def __init__(self, watches: set[_Watch]) -> None:
        super().__init__()
        self._watches = watches

    async def stop(self) -> None:
        self._watches.discard(self)
        self.end()


def channel_prefix(cluster: str, db: int) -> str:
    """The start of a cluster's pub/sub channel names. Keys live in a database, channels do not
    (Redis's pub/sub ignores the database number): a cluster on database 1 names its channels
    apart from the same cluster on database 0, which keeps the names it always had."""
    return f"catga:{{{cluster}}}:" if db == 0 else f"catga:{{{cluster}}}:db{db}:"


class RedisMembers:
    """The membership store of one cluster: see the module docstring.

    Args:
        redis: the client of the transport's pool.
        cluster: the cluster name, which namespaces the keys and the events channel.
        command: the transport's guard around each command.
        commands: plain or sharded pub/sub, for the scripts' announcements.
        channels: the namespace of pub/sub channels (`channel_prefix`; the cluster's by default).
    """

    def __init__(
        self,
        redis: Redis,
        cluster: str,
        command: Command,
        commands: PubSubCommands | None = None,
        channels: str | None = None,
    ) -> None:
        self._redis = redis
        self._command = command
        self._commands = commands or PubSubCommands(None)
        self._prefix = f"catga:{{{cluster}}}:node:"
        self._index = f"catga:{{{cluster}}}:members"
        #: The channel the scripts announce every put and delete on.
        self.events = f"{channels or channel_prefix(cluster, 0)}members:events"
        self._put = redis.register_script(scripts.PUT)
        self._delete = redis.register_script(scripts.DELETE)
        self._list = redis.register_script(scripts.LIST)
        self._watches: set[_Watch] = set()

    async def prepare(self, ttl: float) -> None:
        async with self._command("PING"):
            await self._redis.ping()

    async def put(self, node_id: str, value: bytes, ttl: float) -> None:
        await self._write(node_id, value, ttl)

    async def create(self, node_id: str, value: bytes, ttl: float, *, replacing: bytes | None = None) -> bool:
        return await self._write(node_id, value, ttl, claim=True, replacing=replacing)

    async def _write(
        self, node_id: str, value: bytes, ttl: float, *, claim: bool = False, replacing: bytes | None = None
    ) -> bool:
        notice = pack(Envelope({"kind": "put", "node": node_id}, value))
        ttl_ms = max(1, round(ttl * 1000))
        publish = self._commands.name("PUBLISH")
        args: list[str | int | bytes] = [node_id, ttl_ms, value, self.events, notice, publish]
        args += [int(claim), replacing or b""]  # a record is never empty: b"" matches none
        async with self._command("member create" if claim else "member put"):
            written = await self._put(keys=[self._prefix + node_id, self._index], args=args)
        return bool(written)

    async def delete(self, node_id: str) -> None:
        notice = pack(Envelope({"kind": "delete", "node": node_id}))
        async with self._command("member delete"):
            await self._delete(
                keys=[self._prefix + node_id, self._index],
                args=[node_id, self.events, notice, self._commands.name("PUBLISH")],
            )

    async def list(self) -> dict[str, bytes]:
        async with self._command("member list"):
            found: list[bytes] = await self._list(keys=[self._index], args=[self._prefix])
        return {node_id.decode(): record for node_id, record in zip(found[::2], found[1::2], strict=True)}

    async def watch(self) -> _Watch:
        async with self._command("member watch"):  # no command: a watch listens on the events channel
            watch = _Watch(self._watches)
            self._watches.add(watch)
        return watch

    def on_notice(self, envelope: Envelope) -> None:
        """Hand a notice from the events channel to every watch."""
        kind, node_id = envelope.headers.get("kind"), envelope.headers.get("node")
        if not isinstance(node_id, str) or not node_id or kind not in ("put", "delete"):
            logger.warning("dropped an unreadable membership notice: %s", envelope.headers)
            return
        body = envelope.body
        event = MemberEvent("put", node_id, body) if kind == "put" else MemberEvent("delete", node_id)
        for watch in self._watches:
            watch.put(event)

    def end_watches(self) -> None:
        """End every watch: the connection broke, so their events would be missed from now on."""
        for watch in list(self._watches):
            watch.end()
        self._watches.clear()
