"""The transport's connections to Redis: a pool for membership commands, two private ones for pub/sub,
and for durable queues a pool without retries plus a private connection per blocking reader.

Every one of them copies the first pool's options, so the ACL user, password and TLS files that
`security_options` adds there reach them all."""

from __future__ import annotations

from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from pydantic import SecretStr
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.connection import AbstractConnection, parse_url
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff

from fastapi_catga.core.logs import redact_text, redact_url
from fastapi_catga.exceptions import ConfigurationError
from fastapi_catga.transports.redis.locate import LocatedConnection, LocatedSSLConnection, Locator
from fastapi_catga.transports.tls import TlsFiles

__all__ = [
    "command_pool",
    "once_pool",
    "private_connection",
    "reopen",
    "security_options",
    "sentinel_credentials",
    "uses_tls",
]


def security_options(
    url: str, *, username: str = "", password: SecretStr | None = None, tls: TlsFiles | None = None
) -> dict[str, Any]:
    """redis-py's connection options for an ACL user and password, and TLS files, beside the URL.

    A TLS URL (``rediss://``, ``rediss+sentinel://``, ``rediss+cluster://``) always gets the
    server's certificate and host name checked.

    Raises:
        ConfigurationError: the user or password is given both in the URL and apart (the URL would
            win silently), TLS files with a URL that is not a TLS one, a missing file, or a TLS URL
            whose options turn off the check of the certificate or host name.
    """
    parts = urlsplit(url)
    tls_url = uses_tls(url)
    secret = password.get_secret_value() if password is not None else ""
    options: dict[str, Any] = {}
    if username:
        if parts.username:
            raise ConfigurationError(
                "the Redis user is given twice: in CATGA_REDIS_URL and CATGA_REDIS_USERNAME"
            )
        options["username"] = username
    if secret:
        if parts.password or "password=" in parts.query:
            raise ConfigurationError(
                "the Redis password is given twice: in CATGA_REDIS_URL and CATGA_REDIS_PASSWORD; keep one"
            )
        options["password"] = secret
    if tls is not None and tls.given:
        if not tls_url:
            raise ConfigurationError(
                f"{tls.setting}_* are set but CATGA_REDIS_URL is {parts.scheme}://: use rediss:// for TLS "
                "(rediss+sentinel://, rediss+cluster://)"
            )
        tls.context()  # loaded now, as NATS does: a file that is no PEM of its kind fails by name
        options.update(
            ssl_ca_certs=tls.ca or None, ssl_certfile=tls.cert or None, ssl_keyfile=tls.key or None
        )
    if tls_url:
        _refuse_weakened(parts.query)
        # redis-py before 6.0 does not check the host name unless told to.
        options.update(ssl_cert_reqs="required", ssl_check_hostname=True)
    return options


def sentinel_credentials(
    url: str, *, username: str = "", password: SecretStr | None = None
) -> dict[str, Any]:
    """redis-py's options for the Sentinels' own user and password (the Redis servers' are apart):
    for the Sentinels of a ``redis+sentinel://`` URL that ask for them.

    Raises:
        ConfigurationError: Sentinel credentials with a URL that names no Sentinels.
    """
    secret = password.get_secret_value() if password is not None else ""
    if (username or secret) and not _scheme(url).endswith("+sentinel"):
        raise ConfigurationError(
            "CATGA_REDIS_SENTINEL_USERNAME or _PASSWORD is set but CATGA_REDIS_URL names no "
            "Sentinels: use redis+sentinel://host:26379,.../<master-name>"
        )
    return {name: value for name, value in (("username", username), ("password", secret)) if value}


def _scheme(url: str) -> str:
    return url.partition("://")[0].lower()


def uses_tls(url: str) -> bool:
    """``rediss://``, ``rediss+sentinel://`` or ``rediss+cluster://``."""
    return _scheme(url) in ("rediss", "rediss+sentinel", "rediss+cluster")


def _refuse_weakened(query: str) -> None:
    """Raise `ConfigurationError` when the URL turns off TLS verification (its options would win)."""
    given = {name: values[-1] for name, values in parse_qs(query).items()}
    reqs = given.get("ssl_cert_reqs", "required")
    hostname = given.get("ssl_check_hostname", "true")
    if reqs.lower() != "required" or hostname.upper() in ("", "0", "F", "FALSE", "N", "NO"):
        raise ConfigurationError(
            "CATGA_REDIS_URL turns off TLS verification (ssl_cert_reqs or ssl_check_hostname): catga "
            "always verifies the Redis server's certificate and host name; remove the option"
        )


def command_pool(
    url: str,
    *,
    max_connections: int,
    timeout: float,
    health_check_interval: float,
    security: dict[str, Any] | None = None,
    locator: Locator | None = None,
) -> BlockingConnectionPool:
    """The pool for membership commands: callers wait for a free connection, up to ``timeout``.

    With a ``locator`` (Sentinel, Redis Cluster), every connection made from this pool, or copied
    from its options (`once_pool`, `private_connection`), asks it for the server at each connect.

    Args:
        security: what `security_options` made (user, password, TLS files).

    Raises:
        ConfigurationError: ``url`` is no Redis URL.
    """
    try:
        options: dict[str, Any] = dict(parse_url(url))  # as from_url(), but with a located class
    except ValueError as exc:
        raise ConfigurationError(
            f"invalid CATGA_REDIS_URL {redact_url(url)}: {redact_text(str(exc), url)}"
        ) from None  # redis-py's own error may quote the password
    if locator is not None:
        located = LocatedSSLConnection if uses_tls(url) else LocatedConnection
        options.update(connection_class=located, locator=locator)
    kwargs: dict[str, Any] = {
        **(security or {}),
        "max_connections": max_connections,
        "timeout": timeout,
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "health_check_interval": health_check_interval,
        # Membership commands are safe to repeat: a few quick retries ride out a server restart.
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        "retry_on_error": [OSError],
    }
    kwargs.update(options)  # the URL's own options win, as with from_url()
    try:
        return BlockingConnectionPool(**kwargs)
    except ValueError as exc:  # an option of the URL's query out of range
        raise ConfigurationError(
            f"invalid CATGA_REDIS_URL {redact_url(url)}: {redact_text(str(exc), url)}"
        ) from None  # redis-py's own error may quote the password


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
