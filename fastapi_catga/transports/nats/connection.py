"""`NatsConnection`: one node's nats-py client, which reconnects forever and says when it is up.

The first connect is bounded by ``connect_timeout``, and ends at once when the server refuses the
credentials or the TLS handshake fails: retrying would not help. From then on nats-py reconnects
without end. When the node asks for TLS (`tls_asked`), no connection, first or later, carries
the credentials unless it is TLS (`TlsOnlyClient`).
Each loss and each return is told to the listeners of the `ConnectionState`, once and in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from fastapi_catga.core.logs import redact_url
from fastapi_catga.exceptions import ConfigurationError, TransportError
from fastapi_catga.transports.base import ConnectionState
from fastapi_catga.transports.nats.auth import NatsAuth, refusal
from fastapi_catga.transports.nats.tls_only import TlsOnlyClient, tls_asked

__all__ = ["NatsConnection"]

logger = logging.getLogger(__name__)

_CLOSE_TIMEOUT = 1.0  # s, for closing a client whose first connect failed


class _Refused(Exception):
    """Raised from nats-py's error callback to end the first connect: the server said no."""


class NatsConnection:
    """The nats-py client of a `NatsTransport`, and its state.

    Args:
        servers: ``nats://host:port`` URLs, as a sequence or one comma-separated string.
        connect_timeout: seconds to wait for the first connection, and for each JetStream call.
        ping_interval: seconds between pings; two unanswered pings count as a lost connection.
        reconnect_wait: seconds between reconnect attempts to one server (they never stop).
        connection_name: the connection's name in the server's monitoring.
        on_lost: awaited at a disconnect, before the listeners hear of it.
        auth: credentials and TLS files (none: the URLs' own, if any).
    """

    def __init__(
        self,
        servers: str | Sequence[str],
        *,
        connect_timeout: float,
        ping_interval: float,
        reconnect_wait: float,
        connection_name: str | None,
        on_lost: Callable[[], Awaitable[None]],
        auth: NatsAuth | None = None,
    ) -> None:
        urls = servers.split(",") if isinstance(servers, str) else servers
        self.servers = [url.strip() for url in urls if url.strip()]
        if not self.servers:
            raise ConfigurationError("no NATS server URL given (CATGA_NATS_URL, e.g. nats://localhost:4222)")
        self.where = redact_url(", ".join(self.servers))  # for messages and logs: no password
        for url in self.servers:
            if (problem := _url_problem(url)) is not None:
                given = redact_url(servers if isinstance(servers, str) else ",".join(servers))
                raise ConfigurationError(
                    f"invalid CATGA_NATS_URL {given}: {problem} (expected comma-separated "
                    "nats://[user:password@]host:port URLs; percent-encode , / @ : in a password)"
                )
        self.connect_timeout = connect_timeout
        self.state = ConnectionState()
        #: Messages nats-py dropped because a subscription's pending queue was full.
        self.slow_consumers = 0
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        auth = auth or NatsAuth()
        #: Whether every connection must be TLS before the CONNECT (and credentials) go out.
        self.tls_required = tls_asked(self.servers, auth.tls.given)
        # nats-py annotates the durations as int; they are float seconds.
        self._options: dict[str, Any] = {
            "name": connection_name,
            "connect_timeout": connect_timeout,
            "ping_interval": ping_interval,
            "reconnect_time_wait": reconnect_wait,
            **auth.options(self.servers),
        }
        self._on_lost = on_lost
        self._last_error = ""
        self._opening = False

    @property
    def up(self) -> bool:
        """Whether the connection is up right now (False while nats-py reconnects)."""
        return self.nc is not None and self.nc.is_connected

    def client(self) -> Client:
        """The client, or `TransportError` when closed or not connected (`live`, without JetStream)."""
        nc = self.nc
        if nc is None or not nc.is_connected:
            return self.live()[0]  # raises
        return nc

    def live(self) -> tuple[Client, JetStreamContext]:
        """The client and its JetStream context, or `TransportError` when closed or not connected."""
        if self.nc is None or self.js is None or not self.nc.is_connected:
            state = "closed" if self.state.closed else "not connected" if self.nc is None else "reconnecting"
            raise TransportError(f"NATS at {self.where} is unreachable ({state})")
        return self.nc, self.js

    async def open(self) -> Client:
        """Connect, retrying until ``connect_timeout``; from then on reconnect forever.

        Raises:
            TransportError: no server answered within ``connect_timeout``, or one refused the
                credentials or the TLS handshake; the message says which, never the secret.
        """
        if self.state.closed or self.nc is not None:
            raise TransportError("connect() works once per NatsTransport; make a new one")
        self.nc = nc = TlsOnlyClient() if self.tls_required else Client()
        self._opening = True
        try:
            # With unlimited reconnects nats-py retries the first connect forever too: bound it.
            async with asyncio.timeout(self.connect_timeout):
                await nc.connect(
                    self.servers,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    max_outstanding_pings=2,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    closed_cb=self._on_closed,
                    **self._options,
                )
        except _Refused as exc:
            await self._fail()
            raise TransportError(f"NATS at {self.where}: {exc}") from exc.__cause__
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            await self._fail()
            last = f" (last error: {self._last_error})" if self._last_error else ""
            raise TransportError(
                f"cannot reach NATS at {self.where} within {self.connect_timeout} s{last}"
            ) from exc
        finally:
            self._opening = False
        if isinstance(nc, TlsOnlyClient) and not nc.tls_checked:
            # nats-py connected without asking for the CONNECT line: the check cannot be trusted.
            await self._fail()
            raise TransportError(f"NATS at {self.where}: cannot confirm that the connection is TLS")
        self.js = nc.jetstream(timeout=self.connect_timeout)
        return nc

    async def _fail(self) -> None:
        self.state.close()
        if self.nc is not None:
            # After a failed TLS handshake asyncio's stream never finishes closing: bound the wait.
            # A client that failed before it was set up refuses to close (an AssertionError).
            with contextlib.suppress(TimeoutError, AssertionError):
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await self.nc.close()
            await end_reconnecting(self.nc)

    # -- nats-py's callbacks (it wants them async) ---------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            self.slow_consumers += 1
        refused = refusal(exc)
        if self._opening and refused is not None:
            # nats-py would try again and again until connect_timeout: end the first connect now
            # (once: closing the client may report the same error again).
            self._opening = False
            raise _Refused(refused) from exc
        # A refusal says which settings to check, while running as at start-up (credentials
        # rotated or revoked on a running server).
        text = refused if refused is not None else f"{type(exc).__name__}: {exc}"
        # The same error again (each reconnect attempt while the server is down) is only DEBUG.
        level = logging.DEBUG if text == self._last_error else logging.WARNING
        self._last_error = text
        logger.log(level, "NATS error (%s): %s", self.where, text)

    async def _on_disconnected(self) -> None:
        if self.state.closed:
            return
        logger.warning("lost the NATS connection (%s); reconnecting", self.where)
        await self._on_lost()
        self.state.tell(False)

    async def _on_reconnected(self) -> None:
        self._last_error = ""
        logger.info("reconnected to NATS (%s)", self.where)
        self.state.tell(True)

    async def _on_closed(self) -> None:
        if not self.state.closed:
            logger.warning("the NATS connection closed for good (%s)", self.where)


_SCHEMES = ("nats", "tls", "ws", "wss")


async def end_reconnecting(nc: Client, within: float = 2.0) -> None:
    """Make sure a closed client's reconnect task has ended. nats-py cancels it once, and on 3.11
    ``asyncio.wait_for`` can swallow that cancellation when a connect attempt fails at the same
    moment; the task then retries a dead server for ever, and the process hangs as it exits
    (``asyncio.run`` waits for every task it cancels). Cancelled again until it ends."""
    task: asyncio.Task[None] | None = getattr(nc, "_reconnection_task", None)
    if task is None:
        return
    deadline = asyncio.get_running_loop().time() + within
    while not task.done() and asyncio.get_running_loop().time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=0.05)
    if not task.done():
        logger.warning("nats-py's reconnect task did not end when cancelled; leaving it")


def _url_problem(url: str) -> str | None:
    """What nats-py would choke on in one server URL (no scheme means nats://), or None; it names
    no part of the URL, which may hold a password."""
    try:
        parts = urllib.parse.urlsplit(url if "://" in url else f"nats://{url}")
        hostname = parts.hostname
    except ValueError:  # an unclosed [ or no IP address between [ and ]
        return "a URL's host in [brackets] is no IPv6 address"
    if parts.scheme not in _SCHEMES:
        return f"a URL's scheme is not one of {', '.join(_SCHEMES)}"
    if not hostname:
        return "a URL names no host"
    if any(char.isspace() or not char.isprintable() for char in hostname):
        return "a URL's host holds a space or a control character"
    try:
        parts.port  # noqa: B018 (it parses, and raises for a port out of range)
    except ValueError:
        return "a URL's port is no number from 0 to 65535"
    return None
