"""The transport's connections to Redis: a pool for membership commands, two private ones for pub/sub,
and for durable queues a pool without retries plus a private connection per blocking reader."""

from __future__ import annotations

from typing import Any, Protocol

from redis.asyncio import BlockingConnectionPool
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff

from fastapi_catga.core.logs import redact_url
from fastapi_catga.exceptions import ConfigurationError
from fastapi_catga.transports.redis.locate import LocatedConnection, Locator

__all__ = ["command_pool", "once_pool", "private_connection", "reopen"]


def command_pool(
    url: str,
    *,
    max_connections: int,
    timeout: float,
    health_check_interval: float,
    locator: Locator | None = None,
) -> BlockingConnectionPool:
    """The pool for membership commands: callers wait for a free connection, up to ``timeout``.

    With a ``locator`` (Sentinel, Redis Cluster), every connection made from this pool, or copied
    from its options (`once_pool`, `private_connection`), asks it for the server at each connect.

    Raises:
        ConfigurationError: ``url`` is no Redis URL.
    """
    try:
        return BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            health_check_interval=health_check_interval,
            # Membership commands are safe to repeat: a few quick retries ride out a server restart.
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            retry_on_error=[OSError],
            **_located(locator),
        )
    except ValueError as exc:
        raise ConfigurationError(f"invalid Redis URL {redact_url(url)}: {exc}") from exc


def _located(locator: Locator | None) -> dict[str, Any]:
    return {} if locator is None else {"connection_class": LocatedConnection, "locator": locator}


def once_pool(
    pool: BlockingConnectionPool, *, max_connections: int, timeout: float
) -> BlockingConnectionPool:
    """A pool to ``pool``'s server whose commands redis-py never sends twice.

    An XADD repeated after a lost reply appends the message twice, and a repeated Lua script can
    answer for a state its first run made: such commands fail once, with the caller told so.
    """
    kwargs = {**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0), "retry_on_error": []}
    return BlockingConnectionPool(
        max_connections=max_connections, timeout=timeout, connection_class=pool.connection_class, **kwargs
    )


def private_connection(pool: BlockingConnectionPool) -> AbstractConnection:
    """A connection to the pool's server, outside the pool, for one task to own."""
    # RESP2 makes pub/sub messages plain arrays. No retries, socket timeout or health checks: the
    # owning task bounds every read, PINGs and reconnects by itself.
    kwargs = {**pool.connection_kwargs, "protocol": 2, "socket_timeout": None, "health_check_interval": 0}
    kwargs.update(retry=Retry(NoBackoff(), 0), retry_on_error=[])
    return pool.connection_class(**kwargs)


class _Connect(Protocol):
    async def connect(self) -> None: ...


async def reopen(connection: AbstractConnection) -> None:
    """Close ``connection`` (if it is open) and connect it again."""
    await connection.disconnect()
    unannotated: _Connect = connection  # redis-py leaves AbstractConnection.connect() without types
    await unannotated.connect()
