"""Where the transport's connections go: one server, the master a Sentinel names, or the shard of a
Redis Cluster that owns the catga cluster's slot.

``CATGA_REDIS_URL`` takes three forms:

- ``redis://[user:pass@]host:port/db`` (``rediss://``, ``unix://``): one server, as before.
- ``redis+sentinel://[user:pass@]host:26379[,host:26379...]/<master-name>[/db]``: ask the Sentinels
  (port 26379 unless given) for the master's address at every (re)connect. The credentials are the
  Redis servers'; the Sentinels are asked without any.
- ``redis+cluster://[user:pass@]host:port[,host:port...]``: a Redis Cluster, seeded by these nodes.
  Every key and channel of a catga cluster carries the hash tag ``{<cluster>}``, so all of them live
  in one slot: each (re)connect asks the seeds (and the nodes they named before) which primary owns
  that slot (``CLUSTER SLOTS``) and connects to it with a plain connection. On Redis 7 and later,
  pub/sub is sharded (``SSUBSCRIBE``/``SPUBLISH``) so messages stay on that shard.

A `LocatedConnection` asks its `Locator` for the address before each socket connect, so every path
that reconnects (the subscriber, the writer, the pools, the durable readers) follows a failover.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

__all__ = ["LocatedConnection", "Locator", "PubSubCommands", "SentinelLocator", "located"]

# redis-py leaves these without types: typed here, once.
_socket_connect: Callable[[Connection], Awaitable[None]] = Connection._connect
_new_sentinel: Callable[..., Sentinel] = Sentinel


class Locator:
    """Says where to connect now. The base class is never used by itself."""

    #: Pub/sub is sharded (``SSUBSCRIBE``, ``SPUBLISH``): a Redis Cluster of 7.0 or later.
    sharded = False

    async def locate(self, connection: LocatedConnection) -> tuple[str, int]:
        """The address of the server that ``connection`` should connect to now."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Close the connections this locator keeps to ask its questions."""


class LocatedConnection(Connection):
    """A connection that asks its ``locator`` for the server's address before each socket connect."""

    def __init__(self, *, locator: Locator, **kwargs: Any) -> None:
        self.locator = locator
        #: Its options, for the locator's own connections (credentials, timeouts).
        self.options = kwargs
        super().__init__(**kwargs)

    async def _connect(self) -> None:
        self.host, self.port = await self.locator.locate(self)
        await _socket_connect(self)


def located(connection: object) -> str:
    """`` (now host:port)`` for a located connection, for logs: where a failover took it."""
    if isinstance(connection, LocatedConnection):
        return f" (now {connection.host}:{connection.port})"
    return ""


class PubSubCommands:
    """The pub/sub commands in use: plain, or sharded when the locator says so."""

    def __init__(self, locator: Locator | None) -> None:
        self._locator = locator

    @property
    def sharded(self) -> bool:
        return self._locator is not None and self._locator.sharded

    def name(self, command: str) -> str:
        """``PUBLISH`` -> ``SPUBLISH`` (and so on) when pub/sub is sharded."""
        return "S" + command if self.sharded else command


class SentinelLocator(Locator):
    """The master that the Sentinels name for ``service`` (redis-py's `Sentinel`), asked at each connect."""

    def __init__(self, sentinels: list[tuple[str, int]], service: str, *, timeout: float) -> None:
        self.service = service
        # Sentinels are asked in turn: each gets a share of the connect timeout, so that a frozen
        # one first in line leaves time for the next. No retries: a dead one is skipped at once.
        share = timeout / (len(sentinels) + 1)
        options = {"socket_timeout": share, "socket_connect_timeout": share, "retry": Retry(NoBackoff(), 0)}
        self._sentinel = _new_sentinel(sentinels, sentinel_kwargs=options)

    async def locate(self, connection: LocatedConnection) -> tuple[str, int]:
        host, port = await self._sentinel.discover_master(self.service)
        return str(host), int(port)

    async def aclose(self) -> None:
        await self._sentinel.aclose()
