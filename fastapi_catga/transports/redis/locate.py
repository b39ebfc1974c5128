"""Where the transport's connections go: one server, the master a Sentinel names, or the shard of a
Redis Cluster that owns the catga cluster's slot.

``CATGA_REDIS_URL`` takes three forms:

- ``redis://[user:pass@]host:port/db`` (``rediss://``, ``unix://``): one server, as before.
- ``redis+sentinel://[user:pass@]host:26379[,host:26379...]/<master-name>[/db]``: ask the Sentinels
  (port 26379 unless given) for the master's address at every (re)connect. The credentials are the
  Redis servers'; the Sentinels' own, if they ask for any, are ``CATGA_REDIS_SENTINEL_USERNAME``
  and ``_PASSWORD``.
- ``redis+cluster://[user:pass@]host:port[,host:port...]``: a Redis Cluster, seeded by these nodes.
  Every key and channel of a catga cluster carries the hash tag ``{<cluster>}``, so all of them live
  in one slot: each (re)connect asks the seeds (and the nodes they named before) which primary owns
  that slot (``CLUSTER SLOTS``) and connects to it with a plain connection. On Redis 7 and later,
  pub/sub is sharded (``SSUBSCRIBE``/``SPUBLISH``) so messages stay on that shard.
- ``rediss+sentinel://`` and ``rediss+cluster://``: the same over TLS, to every server and Sentinel,
  each certificate checked against the address the Sentinels or ``CLUSTER SLOTS`` give for it.

A `LocatedConnection` asks its `Locator` for the address before each socket connect, so every path
that reconnects (the subscriber, the writer, the pools, the durable readers) follows a failover.
A failover that leaves the old server up and its clients connected (a manual one, a partition's
end) is seen by `follow`, which asks again every few seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, RedisError

from fastapi_catga.transports.redis.errors import connect_failure, reason

__all__ = [
    "LocatedConnection",
    "LocatedSSLConnection",
    "Locator",
    "PubSubCommands",
    "SentinelLocator",
    "follow",
    "located",
    "outdated",
]

logger = logging.getLogger(__name__)

_SENTINEL_AUTH = "CATGA_REDIS_SENTINEL_USERNAME and CATGA_REDIS_SENTINEL_PASSWORD"

# redis-py leaves these without types: typed here, once.
_socket_connect: Callable[[Connection], Awaitable[None]] = Connection._connect
_new_sentinel: Callable[..., Sentinel] = Sentinel
_should_reconnect: Callable[[Connection], bool] = Connection.should_reconnect


class Locator:
    """Says where to connect now. The base class is never used by itself."""

    #: Pub/sub is sharded (``SSUBSCRIBE``, ``SPUBLISH``): a Redis Cluster of 7.0 or later.
    sharded = False
    #: Counts the times the answer changed: a connection made before the last change is stale.
    generation = 0
    _last: tuple[str, int] | None = None

    async def locate(self, connection: LocatedConnection) -> tuple[str, int]:
        """The address of the server that ``connection`` should connect to now."""
        raise NotImplementedError

    def noted(self, address: tuple[str, int]) -> None:
        """Remember the latest answer; a new one makes every connection made before it stale."""
        if address != self._last:
            self.generation += self._last is not None
            self._last = address

    async def aclose(self) -> None:
        """Close the connections this locator keeps to ask its questions."""


class LocatedConnection(Connection):
    """A connection that asks its ``locator`` for the server's address before each socket connect.

    Once the locator's answer changed, it is stale: a pool then closes it when it is released (an
    in-use connection escapes ``pool.disconnect(inuse_connections=False)``), and the publisher
    reopens it before its next batch.
    """

    def __init__(self, *, locator: Locator, **kwargs: Any) -> None:
        self.locator = locator
        #: Its options, for the locator's own connections (credentials, timeouts).
        self.options = kwargs
        self._generation = locator.generation
        super().__init__(**kwargs)

    async def _connect(self) -> None:
        address = await self.locator.locate(self)
        self.locator.noted(address)
        self.host, self.port = address
        self._generation = self.locator.generation
        await _socket_connect(self)

    @property
    def outdated(self) -> bool:
        """The locator's answer changed since this connection was made."""
        return self._generation != self.locator.generation

    def should_reconnect(self) -> bool:
        return _should_reconnect(self) or self.outdated


class LocatedSSLConnection(LocatedConnection, SSLConnection):
    """A `LocatedConnection` over TLS: the server's certificate must name the address located."""


def outdated(connection: object) -> bool:
    """``connection`` is located, and the locator's answer changed since it was made."""
    return isinstance(connection, LocatedConnection) and connection.outdated


def located(connection: object) -> str:
    """`` (now host:port)`` for a located connection, for logs: where a failover took it."""
    if isinstance(connection, LocatedConnection):
        return f" (now {connection.host}:{connection.port})"
    return ""


async def follow(connection: LocatedConnection, every: float, moved: Callable[[], Awaitable[None]]) -> None:
    """Every ``every`` s, ask ``connection``'s locator where the server is; when the connection is
    connected elsewhere, await ``moved()`` (which reconnects it). Runs until cancelled.

    Sentinel closes the clients of a master it demotes, but some 10 s after a manual failover;
    until then the old master takes writes that its demotion throws away.
    """
    while True:
        await asyncio.sleep(every)
        if not connection.is_connected:
            continue  # reconnecting, which asks the locator anyway
        try:
            async with asyncio.timeout(every):
                address = await connection.locator.locate(connection)
        except (RedisError, OSError) as exc:  # the timeout too; the connection may be fine: ask again later
            logger.debug("cannot check where Redis is now: %s", exc)
            continue
        connection.locator.noted(address)
        if connection.is_connected and address != (connection.host, connection.port):
            logger.warning(
                "Redis moved from %s:%s to %s:%s; reconnecting", connection.host, connection.port, *address
            )
            await moved()


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
    """The master that the Sentinels name for ``service``, asked at each connect.

    Every Sentinel is asked at once (redis-py's `Sentinel` holds a client of each); of the masters
    named up, the one of the highest config epoch wins: right after a failover, a Sentinel that has
    not heard of it yet still names the old master, at the old epoch. Over TLS, the Sentinels are
    asked with the TLS options the servers get (``CATGA_REDIS_TLS_*``, the URL's ``ssl_*``).

    Args:
        credentials: the Sentinels' own ``username`` and ``password``, if they ask for them.
    """

    def __init__(
        self,
        sentinels: list[tuple[str, int]],
        service: str,
        *,
        timeout: float,
        credentials: dict[str, str] | None = None,
    ) -> None:
        self.service = service
        self._hosts = sentinels
        # Half the connect timeout for the question, half for the connection. No retries: a
        # dead Sentinel does not answer, the others do.
        share = timeout / 2
        self._options: dict[str, Any] = {**(credentials or {}), "socket_timeout": share}
        self._options.update(socket_connect_timeout=share, retry=Retry(NoBackoff(), 0))
        self._sentinel: Sentinel | None = None
        self._tls = False

    def _clients(self, connection: LocatedConnection) -> list[Any]:
        """A client of each Sentinel, made at the first question: over TLS if ``connection`` is."""
        if self._sentinel is None:
            options = dict(self._options)
            if isinstance(connection, SSLConnection):
                ssl = {name: value for name, value in connection.options.items() if name.startswith("ssl_")}
                options.update(ssl, ssl=True)
                self._tls = True
            self._sentinel = _new_sentinel(self._hosts, sentinel_kwargs=options)
        clients: list[Any] = self._sentinel.sentinels
        return clients

    async def locate(self, connection: LocatedConnection) -> tuple[str, int]:
        clients = self._clients(connection)
        answers = await asyncio.gather(*(self._ask(client) for client in clients))
        named = [answer for _, answer in answers if isinstance(answer, tuple)]
        if named:
            _, host, port = max(named)
            return host, port
        said: dict[str, list[str]] = {}  # why -> the Sentinels that said so
        for where, answer in answers:
            said.setdefault(str(answer), []).append(where)
        why = "; ".join(f"{', '.join(where)}: {answer}" for answer, where in said.items())
        raise MasterNotFoundError(
            f"none of {len(clients)} Sentinel(s) names a master {self.service!r} up ({why})"
        )

    async def _ask(self, sentinel: Any) -> tuple[str, tuple[int, str, int] | str]:
        """This Sentinel's ``host:port``, and the ``(config epoch, host, port)`` of the master it
        names up, or why it names none."""
        options = sentinel.connection_pool.connection_kwargs
        where = f"{options['host']}:{options['port']}"
        try:
            masters = await sentinel.sentinel_masters()
        except (RedisError, OSError) as exc:
            logger.debug("Sentinel %s did not answer: %s", where, exc)
            if not isinstance(exc, AuthenticationError):
                return where, connect_failure(exc, tls=self._tls)
            if "password" in self._options:
                return where, f"refused the credentials ({reason(exc)}); check {_SENTINEL_AUTH}"
            return where, f"asks for credentials ({reason(exc)}); set {_SENTINEL_AUTH}"
        state = masters.get(self.service)
        if not state:
            return where, "watches no master of that name: check <master-name> in CATGA_REDIS_URL"
        if not state["is_master"] or state["is_sdown"] or state["is_odown"]:
            return where, "says it is down (a failover may be under way)"
        return where, (int(state["config-epoch"]), str(state["ip"]), int(state["port"]))

    async def aclose(self) -> None:
        if self._sentinel is not None:
            await self._sentinel.aclose()
