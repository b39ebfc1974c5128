"""`NatsAuth`: how a node proves who it is to NATS (one way of four), and the TLS it speaks.

Everything is checked when the transport is made: one way to authenticate, files that exist and
read as what they should be, so a mistake fails at start-up with the setting's name. Secrets stay
`SecretStr` until they are handed to nats-py, and no message here ever holds one.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats.errors
from pydantic import SecretStr

from fastapi_catga.exceptions import ConfigurationError
from fastapi_catga.transports.nats.tls_only import PlaintextRefused
from fastapi_catga.transports.tls import TlsFiles

__all__ = ["NatsAuth", "refusal"]

_WAYS = (
    "CATGA_NATS_USER and CATGA_NATS_PASSWORD",
    "CATGA_NATS_TOKEN",
    "CATGA_NATS_NKEY_SEED_FILE",
    "CATGA_NATS_CREDS_FILE",
)
_CHECK_TLS = "check CATGA_NATS_TLS_CA, CATGA_NATS_TLS_CERT and CATGA_NATS_TLS_KEY"
_CHECK_AUTH = f"check {', '.join(_WAYS)}, or the user in CATGA_NATS_URL"
#: Words of the server's -ERR lines that mean "your credentials were refused".
_REFUSED = ("authorization", "authentication", "revoked")


@dataclass(frozen=True, slots=True)
class NatsAuth:
    """How a node authenticates to NATS, and its TLS files. Give at most one way to authenticate.

    Args:
        user: a user name, with ``password``.
        password: that user's password.
        token: a token (the server's ``authorization { token: ... }``).
        nkey_seed_file: a file holding an nkey user seed (``SU...``); the server knows its public key.
        creds_file: a ``.creds`` file (a user JWT and its seed), for servers run with operator JWTs.
        tls: CA, client certificate and key. Given, the node insists on TLS, as for ``tls://``
            URLs; a server that requires TLS gets it from ``nats://`` URLs too.
    """

    user: str = ""
    password: SecretStr = field(default=SecretStr(""), repr=False)
    token: SecretStr = field(default=SecretStr(""), repr=False)
    nkey_seed_file: str = ""
    creds_file: str = ""
    tls: TlsFiles = TlsFiles(setting="CATGA_NATS_TLS")

    def options(self, servers: Sequence[str]) -> dict[str, Any]:
        """The keyword arguments of nats-py's ``connect()`` for these credentials and files.

        Raises:
            ConfigurationError: two ways to authenticate (the URLs' ``user:password@`` counts as
                one), a password without a user, a file that is missing or is no seed, or the
                ``nkeys`` package missing for seeds and creds.
        """
        ways = [
            bool(self.user or self.password.get_secret_value()),
            bool(self.token.get_secret_value()),
            bool(self.nkey_seed_file),
            bool(self.creds_file),
        ]
        if sum(ways) > 1:
            given = ", ".join(way for way, on in zip(_WAYS, ways, strict=True) if on)
            raise ConfigurationError(f"give one way to authenticate to NATS, not several: {given}")
        if any(ways) and any(_userinfo(url) for url in servers):
            raise ConfigurationError(
                "NATS credentials given twice: in CATGA_NATS_URL (user:password@ or token@) and in "
                f"{next(way for way, on in zip(_WAYS, ways, strict=True) if on)}; keep one"
            )
        options: dict[str, Any] = {}
        if ways[0]:
            if not (self.user and self.password.get_secret_value()):
                raise ConfigurationError("CATGA_NATS_USER and CATGA_NATS_PASSWORD go together: give both")
            options.update(user=self.user, password=self.password.get_secret_value())
        if ways[1]:
            options["token"] = self.token.get_secret_value()
        if self.nkey_seed_file:
            _check_seed(self.nkey_seed_file)
            options["nkeys_seed"] = self.nkey_seed_file
        if self.creds_file:
            _check_creds(self.creds_file)
            options["user_credentials"] = self.creds_file
        if self.tls.given:
            options["tls"] = self.tls.context()
        return options


def refusal(exc: BaseException) -> str | None:
    """What the server (or the TLS handshake) refused, when ``exc`` says so; None for other errors.

    A refusal will not go away by itself, so the first connect stops at it rather than retrying.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the TLS handshake failed ({exc.reason}: {exc.verify_message}); {_CHECK_TLS}"
    if isinstance(exc, ssl.SSLError):
        return f"the TLS handshake failed ({exc.reason or exc}); {_CHECK_TLS}"
    if isinstance(exc, PlaintextRefused):
        return str(exc)
    if isinstance(exc, nats.errors.AuthorizationError):
        return f"the server refused the credentials (authorization violation); {_CHECK_AUTH}"
    if isinstance(exc, nats.errors.Error):
        text = str(exc).removeprefix("nats: ").strip("'\" ")
        if any(word in text.lower() for word in _REFUSED):
            return f"the server refused the credentials ({text}); {_CHECK_AUTH}"
    return None


def _userinfo(url: str) -> bool:
    """Whether a server URL carries ``user:password@`` or ``token@``."""
    return "@" in urlsplit(url if "://" in url else f"nats://{url}").netloc


def _read(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"{setting}: cannot read {path} ({exc.strerror})") from exc


def _nkeys() -> Any:
    try:
        import nkeys  # nats-py imports it only for seeds and creds: check it is there up front
    except ImportError as exc:
        raise ConfigurationError(
            "nkey seeds and .creds files need the nkeys package: pip install 'fastapi-catga[nats]'"
        ) from exc
    return nkeys


def _check_seed(path: str) -> None:
    seed = _read(path, "CATGA_NATS_NKEY_SEED_FILE").strip()
    try:
        _nkeys().from_seed(bytearray(seed)).wipe()
    except ConfigurationError:
        raise
    except Exception:  # nkeys raises several kinds; none of their messages is needed here
        raise ConfigurationError(
            f"CATGA_NATS_NKEY_SEED_FILE: {path} holds no nkey seed (one line, starting with S)"
        ) from None  # the cause could quote the seed


def _check_creds(path: str) -> None:
    text = _read(path, "CATGA_NATS_CREDS_FILE")
    _nkeys()
    if b"BEGIN NATS USER JWT" not in text or b"BEGIN USER NKEY SEED" not in text:
        raise ConfigurationError(
            f"CATGA_NATS_CREDS_FILE: {path} is no .creds file (it needs a user JWT and a user nkey seed)"
        )
