"""`TlsOnlyClient`: a nats-py client that writes its CONNECT, credentials and all, only over TLS.

nats-py upgrades a connection to TLS only when the server's INFO says ``tls_required``: the
``tls://`` scheme is not checked. A server without a ``tls {}`` block, or a man in the middle that
rewrites INFO, would read the password or token in clear. When the node asks for TLS (a ``tls://``
URL or TLS files), this client checks each connection, first and reconnects alike, after INFO and
any upgrade and before CONNECT is written: not encrypted, the attempt ends with nothing sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

import nats.errors
from nats.aio.client import Client
from nats.aio.transport import TcpTransport

from fastapi_catga.exceptions import ConfigurationError

__all__ = ["PlaintextRefused", "TlsOnlyClient", "tls_asked"]


class PlaintextRefused(nats.errors.Error):
    """The server did not offer TLS where the node asks for it; the CONNECT was not sent."""

    def __str__(self) -> str:
        return (
            "the server did not offer TLS (no tls_required in its INFO), and the node asks for it "
            "(a tls:// URL or CATGA_NATS_TLS_*): nothing was sent; enable TLS on the server "
            "(tls { cert_file, key_file }) or check that CATGA_NATS_URL names the right server"
        )


def tls_asked(servers: Sequence[str], files_given: bool) -> bool:
    """Whether the node insists on TLS: a ``tls://`` URL among ``servers``, or TLS files given."""
    return files_given or any(urlsplit(url).scheme == "tls" for url in servers)


class TlsOnlyClient(Client):
    """A nats-py `Client` that refuses to send CONNECT over a connection that is not TLS."""

    def __init__(self) -> None:
        # The check hooks into nats-py's CONNECT; without that method it would silently not run.
        if not callable(getattr(Client, "_connect_command", None)):
            raise ConfigurationError(
                "this nats-py version cannot be made to insist on TLS: use nats-py 2.15 or 2.16"
            )
        super().__init__()
        #: Whether a CONNECT passed the check (so the check did run).
        self.tls_checked = False

    def _connect_command(self) -> bytes:
        if not self._encrypted():
            raise PlaintextRefused()
        self.tls_checked = True
        return super()._connect_command()

    def _encrypted(self) -> bool:
        transport = self._transport
        if isinstance(transport, TcpTransport):
            writer = transport._io_writer
            return writer is not None and writer.get_extra_info("ssl_object") is not None
        # WebSocket: only wss:// is made with the TLS context.
        server = self._current_server
        return server is not None and server.uri.scheme == "wss"
