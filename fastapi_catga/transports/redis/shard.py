"""`ShardLocator`: the primary of the Redis Cluster shard that owns one slot, asked at each connect.

A catga cluster's keys and channels all hash to the slot of ``{<cluster>}``, so one shard serves
all of them: plain connections to its primary do, and redis-py's cluster client (whose asyncio
flavour had no pub/sub until recently) is not needed. A failover or a resharding breaks those
connections (or answers ``MOVED``); the next connect asks again.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.asyncio.connection import Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from fastapi_catga.transports.redis.connections import reopen
from fastapi_catga.transports.redis.errors import connect_failure
from fastapi_catga.transports.redis.locate import LocatedConnection, Locator

__all__ = ["ShardLocator"]

logger = logging.getLogger(__name__)

_OWN = {"db", "retry", "retry_on_error", "health_check_interval", "protocol"}


class ShardLocator(Locator):
    """Asks the seeds, then every node they named before, which primary owns ``slot``.

    Args:
        seeds: ``(host, port)`` of some cluster nodes (the URL's).
        slot: the catga cluster's slot.
        timeout: the connect timeout: each node asked gets a share of it, so that a frozen node
            first in line leaves time to ask the next one.
    """

    def __init__(self, seeds: list[tuple[str, int]], slot: int, *, timeout: float) -> None:
        self.slot = slot
        self._nodes = list(dict.fromkeys(seeds))  # the node that answered last, the seeds, the nodes learnt
        self._timeout = timeout / (len(self._nodes) + 1)

    async def locate(self, connection: LocatedConnection) -> tuple[str, int]:
        errors: list[str] = []
        tls = isinstance(connection, SSLConnection)
        for node in list(self._nodes):
            try:
                owner = await self._ask(node, connection)
            except (RedisError, OSError, LookupError) as exc:
                errors.append(f"{node[0]}:{node[1]}: {connect_failure(exc, tls=tls)}")
            else:
                self._nodes.remove(node)
                self._nodes.insert(0, node)  # ask it first next time
                return owner
        raise RedisConnectionError(
            f"no Redis Cluster node says who owns slot {self.slot}: {'; '.join(errors)}"
        )

    async def _ask(self, node: tuple[str, int], connection: LocatedConnection) -> tuple[str, int]:
        """``CLUSTER SLOTS`` and ``COMMAND INFO SPUBLISH`` on one node, on a connection of its own
        (over TLS when ``connection`` is)."""
        kwargs = {key: value for key, value in connection.options.items() if key not in _OWN}
        kwargs.update(host=node[0], port=node[1], protocol=2, retry=Retry(NoBackoff(), 0))
        kwargs.update(socket_timeout=self._timeout, socket_connect_timeout=self._timeout)
        asking = (SSLConnection if isinstance(connection, SSLConnection) else Connection)(**kwargs)
        try:
            await reopen(asking)
            await asking.send_command("CLUSTER", "SLOTS")
            ranges: list[list[Any]] = await asking.read_response()
            await asking.send_command("COMMAND", "INFO", "SPUBLISH")
            spublish: list[Any] = await asking.read_response()
        finally:
            await asking.disconnect()
        self.sharded = bool(spublish and spublish[0])
        owner = None
        for start, end, primary, *_ in ranges:
            host, port = _address(primary, node[0])
            if (host, port) not in self._nodes:
                self._nodes.append((host, port))
            if start <= self.slot <= end:
                owner = host, port
        if owner is None:
            raise LookupError(f"slot {self.slot} has no owner (is the cluster's setup finished?)")
        return owner


def _address(node: list[Any], asked: str) -> tuple[str, int]:
    """A ``CLUSTER SLOTS`` node entry's address; an empty or ``?`` host is the node that answered."""
    host = node[0].decode() if isinstance(node[0], bytes) else str(node[0])
    return (asked if host in ("", "?") else host), int(node[1])
