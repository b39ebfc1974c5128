"""redis-py's errors as ours: one table, applied where the transport calls redis-py."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

from redis.exceptions import AuthenticationError, MovedError, ReadOnlyError, RedisError, ResponseError

from fastapi_catga.exceptions import CatgaError, TransportError

__all__ = ["BROKER_ERRORS", "ERRORS", "connect_failure", "moved_away", "reason", "redis_errors"]

#: What redis-py (and the socket under it) raises -> ours; the first entry that matches wins. Each
#: means Redis or the connection to it failed; the message names the command and the cause.
#: asyncio's TimeoutError (the bound on every command) is an OSError, and so is our own
#: TransportError, which passes unchanged.
ERRORS: dict[type[Exception], type[CatgaError]] = {
    RedisError: TransportError,  # redis.exceptions.*: ConnectionError, TimeoutError, ResponseError...
    OSError: TransportError,  # the socket, and the command timeout
}
#: Every error that means Redis or the connection failed, rather than a bug of ours.
BROKER_ERRORS = tuple(ERRORS)


def moved_away(exc: BaseException | None) -> bool:
    """The server no longer takes this cluster's writes: ``MOVED`` (the Redis Cluster slot has another
    owner) or ``READONLY`` (a demoted master; inside a Lua script's error too)."""
    if isinstance(exc, MovedError | ReadOnlyError):
        return True
    return isinstance(exc, ResponseError) and "READONLY" in str(exc)


def reason(exc: BaseException) -> str:
    """An error's message, or its class name when it has none (asyncio's TimeoutError)."""
    return str(exc) or type(exc).__name__


def connect_failure(exc: BaseException, *, tls: bool) -> str:
    """Why the first connection failed, with the settings to check when the server refused us."""
    if isinstance(exc, AuthenticationError):
        return (
            f"the server refused the credentials ({reason(exc)}); check CATGA_REDIS_USERNAME and "
            "CATGA_REDIS_PASSWORD, or the user and password in CATGA_REDIS_URL"
        )
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"the TLS handshake failed ({cause.reason}: {cause.verify_message}); {_CHECK_TLS}"
    if isinstance(cause, ssl.SSLError):
        return f"the TLS handshake failed ({cause.reason or cause}); {_CHECK_TLS}"
    if tls and isinstance(exc, RedisError | ConnectionError) and "reset by peer" in str(exc):
        # A server that refuses the client's certificate (TLS 1.3) often just closes the connection.
        return f"{reason(exc)}; did the server refuse the client certificate? {_CHECK_TLS}"
    return reason(exc)


_CHECK_TLS = "check CATGA_REDIS_TLS_CA, CATGA_REDIS_TLS_CERT and CATGA_REDIS_TLS_KEY"


def first_connect_failure(exc: BaseException, *, tls: bool, timeout: float) -> str:
    """`connect_failure` of a transport's first connection, where a URL that has never worked may
    name the wrong scheme: TLS on one side only looks like a reset, or like no answer."""
    if isinstance(exc, TimeoutError):
        if tls:  # a server without TLS waits for the rest of a command a handshake never sends
            return f"no answer within {timeout:g} s; is the server one without TLS (then redis://)?"
        return f"no answer within {timeout:g} s"
    why = connect_failure(exc, tls=tls)
    if not tls and any(word in why for word in _ENDED_BY_SERVER):  # as a TLS-only server ends a
        # plain connection: a reset, or a lost socket, depending on when the client writes
        return f"{why}; if the server takes TLS only, the URL is rediss://"
    return why


#: How redis-py says the server ended a connection it had accepted.
_ENDED_BY_SERVER = ("reset by peer", "Connection lost", "Connection closed by server")


@contextlib.asynccontextmanager
async def redis_errors(
    what: str, where: str, timeout: float, moved: Callable[[], Awaitable[None]] | None = None
) -> AsyncIterator[None]:
    """Bound the block by the command ``timeout`` and raise redis-py's errors as ours (`ERRORS`);
    await ``moved()`` first when the server no longer takes the cluster's writes (`moved_away`)."""
    try:
        async with asyncio.timeout(timeout):
            yield
    except BROKER_ERRORS as exc:
        if isinstance(exc, CatgaError):
            raise
        if moved is not None and moved_away(exc):
            await moved()
        ours = next(ours for theirs, ours in ERRORS.items() if isinstance(exc, theirs))
        raise ours(f"Redis at {where}: {what} failed: {reason(exc)}") from exc
