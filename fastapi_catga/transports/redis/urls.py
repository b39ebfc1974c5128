"""``CATGA_REDIS_URL`` parsed: which server(s), and who locates the one to connect to (`locate`)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from redis.crc import key_slot

from fastapi_catga.core.logs import redact_text, redact_url
from fastapi_catga.exceptions import ConfigurationError
from fastapi_catga.transports.redis.connections import uses_tls
from fastapi_catga.transports.redis.locate import Locator, SentinelLocator
from fastapi_catga.transports.redis.shard import ShardLocator

__all__ = ["Target", "target"]

_SENTINEL_PORT = 26379
_REDIS_PORT = 6379


@dataclass(frozen=True)
class Target:
    """A parsed ``CATGA_REDIS_URL``: the URL the pools are made from, and who locates the server."""

    #: A ``redis://`` URL with the credentials, database and options (its host is replaced at connect).
    url: str
    locator: Locator | None


def target(url: str, *, cluster: str, timeout: float, sentinel: dict[str, str] | None = None) -> Target:
    """Parse ``url`` (see the module docstring).

    Args:
        sentinel: the Sentinels' own credentials (`connections.sentinel_credentials`).

    Raises:
        ConfigurationError: a ``redis+sentinel://`` or ``redis+cluster://`` URL without its parts;
            a ``redis://`` one with several hosts, or a path that is no database number.
    """
    scheme = url.partition("://")[0].lower().replace("rediss+", "redis+")
    if _password_cut(url):
        raise ConfigurationError(
            f"a / ? or # in a Redis URL's password is written %2F, %3F or %23: {redact_url(url)}"
        )
    tls = uses_tls(url)
    if scheme == "redis+sentinel":
        return _sentinel_target(url, timeout, tls, sentinel or {})
    if scheme == "redis+cluster":
        userinfo, hosts, path, query = _split(url, _REDIS_PORT)
        if path.strip("/") not in ("", "0"):
            raise ConfigurationError(f"a Redis Cluster has only database 0: {redact_url(url)}")
        slot = key_slot(f"{{{cluster}}}".encode())
        plain = _plain(tls, userinfo, hosts[0], "0", query)
        return Target(plain, ShardLocator(hosts, slot, timeout=timeout))
    if scheme in ("redis", "rediss"):
        _check_plain(url)
    return Target(url, None)


def _password_cut(url: str) -> bool:
    """Whether the host part ended inside a password: at a / ? or # in it, the rest read as a path,
    a query or a fragment, and ``user:pass`` as the host and a port that is no number."""
    netloc = urlsplit(url).netloc
    port = netloc.rpartition(":")[2] if ":" in netloc and not netloc.endswith("]") else ""
    return "@" not in netloc and "@" in url.partition("://")[2] and not port.isdigit() and port != ""


def _check_plain(url: str) -> None:
    """Refuse what redis-py would read as something else: several hosts (it takes the first) and
    a path that is no database number (``/abc`` is db 0 to it, ``/1/2`` db 12)."""
    parts = urlsplit(url)
    if "," in parts.netloc.rpartition("@")[2]:
        raise ConfigurationError(
            "a redis:// URL names one server; for several, redis+sentinel://host,host/<master-name> "
            f"or redis+cluster://host,host: {redact_url(url)}"
        )
    db = parts.path.removeprefix("/")
    if db and not (db.isascii() and db.isdigit()):
        raise ConfigurationError(
            f"the path of a redis:// URL is a database number (/0, /1...), and a / ? or # in a "
            f"password is written %2F, %3F or %23: {redact_url(url)}"
        )


def _sentinel_target(url: str, timeout: float, tls: bool, credentials: dict[str, str]) -> Target:
    userinfo, hosts, path, query = _split(url, _SENTINEL_PORT)
    service, _, db = path.strip("/").partition("/")
    if not service or (db and not db.isdigit()):
        raise ConfigurationError(
            f"a Sentinel URL names the master: redis+sentinel://host:26379,host:26379/<master-name>[/db], "
            f"got {redact_url(url)}"
        )
    return Target(
        _plain(tls, userinfo, hosts[0], db or "0", query),
        SentinelLocator(hosts, unquote(service), timeout=timeout, credentials=credentials),
    )


def _split(url: str, default_port: int) -> tuple[str, list[tuple[str, int]], str, str]:
    """``(userinfo with its @, [(host, port)...], path, query)`` of a URL with comma-separated hosts."""
    parts = urlsplit(url)
    userinfo, _, netloc = parts.netloc.rpartition("@")
    hosts = [_host(part, default_port, url) for part in netloc.split(",")]
    return (userinfo + "@" if userinfo else ""), hosts, parts.path, parts.query


def _host(part: str, default_port: int, url: str) -> tuple[str, int]:
    host, port = part, ""
    if part.startswith("["):  # [IPv6]:port
        host, _, rest = part[1:].partition("]")
        port = rest.removeprefix(":")
    elif ":" in part:
        host, _, port = part.rpartition(":")
    if not host or port and not port.isdigit():
        shown = redact_text(repr(part), url)
        raise ConfigurationError(f"bad host:port {shown} in CATGA_REDIS_URL {redact_url(url)}")
    return host, int(port) if port else default_port


def _plain(tls: bool, userinfo: str, host: tuple[str, int], db: str, query: str) -> str:
    name = f"[{host[0]}]" if ":" in host[0] else host[0]
    scheme = "rediss" if tls else "redis"
    return f"{scheme}://{userinfo}{name}:{host[1]}/{db}" + (f"?{query}" if query else "")
