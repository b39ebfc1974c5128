"""`TlsFiles`: the PEM files a broker client verifies its server with, and proves itself with.

One shape for both brokers: NATS gets an `ssl.SSLContext` made of them, redis-py gets the paths.
The files are loaded when the transport is made, so a wrong path or a file that is not what it
should be fails at start-up, by name, rather than in a reconnect loop.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from fastapi_catga.exceptions import ConfigurationError

__all__ = ["TlsFiles"]


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Client TLS from PEM files; an empty path means "not given".

    Args:
        ca: the CA certificate(s) that signed the server's certificate; empty: the system's CAs.
        cert: this client's certificate chain, for servers that ask for one (mutual TLS).
        key: the private key of ``cert`` (unencrypted PEM).
        setting: the prefix of the settings these came from (``CATGA_NATS_TLS``), for messages.
    """

    ca: str = ""
    cert: str = ""
    key: str = ""
    setting: str = "TLS"

    @property
    def given(self) -> bool:
        """Whether any file is given."""
        return bool(self.ca or self.cert or self.key)

    def check(self) -> None:
        """Raise `ConfigurationError` unless every file given exists, and cert and key come together."""
        if bool(self.cert) != bool(self.key):
            raise ConfigurationError(
                f"{self.setting}_CERT and {self.setting}_KEY go together: give both files for a "
                "client certificate, or neither"
            )
        for part in ("ca", "cert", "key"):
            path = getattr(self, part)
            if path and not Path(path).is_file():
                raise ConfigurationError(f"{self.setting}_{part.upper()}: no such file: {path}")

    def context(self) -> ssl.SSLContext:
        """A client context that verifies the server (and its host name) against ``ca``.

        Raises:
            ConfigurationError: a file is missing or is no PEM certificate or key of the right kind.
        """
        self.check()
        # Each step names its files; the reason names the problem (e.g. "PEM lib"), never a key's bytes.
        try:
            context = ssl.create_default_context(cafile=self.ca or None)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigurationError(
                f"{self.setting}_CA: cannot load {self.ca} as PEM CA certificates ({exc})"
            ) from exc
        if self.cert:
            try:
                context.load_cert_chain(self.cert, self.key)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigurationError(
                    f"{self.setting}_CERT/_KEY: cannot load {self.cert} and {self.key} as a PEM "
                    f"certificate and its unencrypted key ({exc})"
                ) from exc
        return context
