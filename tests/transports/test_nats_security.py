"""NATS with credentials and TLS: a real nats-server (2.15, from pip) per test, in each auth mode.

For every mode a node joins a cluster and a send round-trips with the right settings, and the wrong
ones stop start-up at once (not after the connect timeout) with an error that says what was refused
and shows no secret, in the error or in the logs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nkeys
import pytest
from pydantic import SecretStr

from fastapi_catga.core.envelope import Envelope
from fastapi_catga.exceptions import ConfigurationError, TransportError
from fastapi_catga.settings import CatgaSettings
from fastapi_catga.transports import create_transport
from fastapi_catga.transports.nats import NatsAuth, NatsTransport
from fastapi_catga.transports.tls import TlsFiles
from tests.polling import eventually
from tests.secure import Operator, Pki, make_pki, new_nkey
from tests.servers import NatsServer
from tests.transports.security import join_and_round_trip, refused_at_start

pytestmark = pytest.mark.nats

PASSWORD = "n4ts-Pa55-w0rd"
TOKEN = "t0ken-0f-the-n0des"
MODES = ["password", "url-password", "token", "nkey", "creds", "mutual-tls"]


@dataclass
class Secured:
    """A nats-server that asks for one kind of credentials, and settings with right and wrong ones."""

    server: NatsServer
    right: dict[str, Any]
    wrong: dict[str, Any]
    secrets: list[str] = field(default_factory=list)
    refusal: str = "refused the credentials"


def _server(directory: Path, config: str) -> NatsServer:
    path = directory / "nats.conf"
    path.write_text(config)
    return NatsServer(extra_args=["-c", str(path)])


def _seed_file(path: Path, prefix: int = nkeys.PREFIX_BYTE_USER) -> tuple[str, str, str]:
    seed, public = new_nkey(prefix)
    path.write_bytes(seed + b"\n")
    return str(path), public, seed.decode()


def _secured(mode: str, directory: Path, pki: Pki) -> Secured:
    made = _unstarted(mode, directory, pki)
    made.server.start()
    return made


def _unstarted(mode: str, directory: Path, pki: Pki) -> Secured:
    if mode in ("password", "url-password"):
        server = _server(directory, f'authorization {{ user: catga, password: "{PASSWORD}" }}\n')
        wrong_password = "Wr0ng-" + PASSWORD
        if mode == "url-password":
            url = f"nats://catga:{{}}@127.0.0.1:{server.port}"
            right = {"nats_url": url.format(PASSWORD)}
            wrong = {"nats_url": url.format(wrong_password)}
        else:
            right = {"nats_url": server.url, "nats_user": "catga", "nats_password": PASSWORD}
            wrong = {**right, "nats_password": wrong_password}
        return Secured(server, right, wrong, [PASSWORD, wrong_password])
    if mode == "token":
        server = _server(directory, f'authorization {{ token: "{TOKEN}" }}\n')
        right = {"nats_url": server.url, "nats_token": TOKEN}
        return Secured(server, right, {**right, "nats_token": TOKEN[::-1]}, [TOKEN, TOKEN[::-1]])
    if mode == "nkey":
        seed_file, public, seed = _seed_file(directory / "user.nk")
        stranger_file, _, stranger = _seed_file(directory / "stranger.nk")
        server = _server(directory, f"authorization {{ users: [ {{ nkey: {public} }} ] }}\n")
        right = {"nats_url": server.url, "nats_nkey_seed_file": seed_file}
        return Secured(server, right, {**right, "nats_nkey_seed_file": stranger_file}, [seed, stranger])
    if mode == "creds":
        operator = Operator.new()
        server = _server(directory, operator.config(directory))
        creds = operator.creds(directory / "node.creds")
        rogue_account, _ = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)  # an account the operator never signed
        rogue = operator.creds(directory / "rogue.creds", signer=rogue_account)
        right = {"nats_url": server.url, "nats_creds_file": creds}
        secrets = [_creds_seed(creds), _creds_seed(rogue)]
        return Secured(server, right, {**right, "nats_creds_file": rogue}, secrets)
    assert mode == "mutual-tls"
    server = _server(
        directory,
        f'tls {{ cert_file: "{pki.server_cert}", key_file: "{pki.server_key}", '
        f'ca_file: "{pki.ca}", verify: true, timeout: 5 }}\n',
    )
    right = {
        "nats_url": f"tls://127.0.0.1:{server.port}",
        "nats_tls_ca": pki.ca,
        "nats_tls_cert": pki.client_cert,
        "nats_tls_key": pki.client_key,
    }
    # A client certificate from a CA the server does not trust: the server ends the handshake.
    wrong = {**right, "nats_tls_cert": pki.other_client_cert, "nats_tls_key": pki.other_client_key}
    key_body = Path(pki.other_client_key).read_text().splitlines()[1]
    return Secured(server, right, wrong, [key_body], refusal="TLS")


def _creds_seed(path: str) -> str:
    return next(line for line in Path(path).read_text().splitlines() if line.startswith("SU"))


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


@pytest.fixture(params=MODES)
def secured(request: pytest.FixtureRequest, tmp_path: Path, pki: Pki) -> Iterator[Secured]:
    made = _secured(request.param, tmp_path, pki)
    try:
        yield made
    finally:
        made.server.close()


async def test_a_node_with_the_right_credentials_joins_and_round_trips(
    secured: Secured, cluster: str
) -> None:
    await join_and_round_trip(cluster, {"transport": "nats", **secured.right})


async def test_wrong_credentials_stop_start_up_at_once_without_the_secret(
    secured: Secured, cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The connect timeout is 5 s: failing well before it shows the refusal ended the retry loop.
    error = await refused_at_start(
        cluster, {"transport": "nats", **secured.wrong}, secured.secrets, caplog, within=4
    )
    assert secured.refusal in str(error)
    assert f"127.0.0.1:{secured.server.port}" in str(error)


async def test_no_credentials_at_all_are_refused_too(
    secured: Secured, cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = secured.right["nats_url"]
    bare = url.split("@")[-1] if "@" in url else url
    fields: dict[str, Any] = {"transport": "nats", "nats_url": bare}
    if bare.startswith("tls://"):
        fields["nats_tls_ca"] = secured.right["nats_tls_ca"]  # trusts the server, shows no certificate
    error = await refused_at_start(cluster, fields, secured.secrets, caplog, within=4)
    assert "refused" in str(error) or "TLS" in str(error)


async def test_a_server_certificate_from_an_unknown_ca_is_refused(
    tmp_path: Path, pki: Pki, cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    with _server(
        tmp_path, f'tls {{ cert_file: "{pki.server_cert}", key_file: "{pki.server_key}" }}\n'
    ) as server:
        fields = {"transport": "nats", "nats_url": server.url, "nats_tls_ca": pki.other_ca}
        error = await refused_at_start(cluster, fields, [], caplog, within=4)
        assert "TLS handshake failed" in str(error) and "CERTIFICATE_VERIFY_FAILED" in str(error)


async def test_server_only_tls_with_a_password(tmp_path: Path, pki: Pki, cluster: str) -> None:
    config = (
        f'tls {{ cert_file: "{pki.server_cert}", key_file: "{pki.server_key}" }}\n'
        f'authorization {{ user: catga, password: "{PASSWORD}" }}\n'
    )
    with _server(tmp_path, config) as server:
        await join_and_round_trip(
            cluster,
            {
                "transport": "nats",
                "nats_url": f"tls://localhost:{server.port}",
                "nats_tls_ca": pki.ca,
                "nats_user": "catga",
                "nats_password": PASSWORD,
            },
        )


# -- settings that cannot work fail before any connection --------------------------------------------


def _transport(**fields: Any) -> NatsTransport:
    transport = create_transport(CatgaSettings.model_validate({"transport": "nats", **fields}))
    assert isinstance(transport, NatsTransport)
    return transport


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"nats_user": "catga", "nats_token": TOKEN}, "not several"),
        ({"nats_password": PASSWORD}, "CATGA_NATS_USER and CATGA_NATS_PASSWORD go together"),
        ({"nats_url": f"nats://catga:{PASSWORD}@h:4222", "nats_token": TOKEN}, "given twice"),
        ({"nats_nkey_seed_file": "/nonexistent/user.nk"}, "CATGA_NATS_NKEY_SEED_FILE: cannot read"),
        ({"nats_creds_file": "/nonexistent/node.creds"}, "CATGA_NATS_CREDS_FILE: cannot read"),
        ({"nats_tls_ca": "/nonexistent/ca.pem"}, "CATGA_NATS_TLS_CA: no such file"),
        (
            {"nats_tls_cert": "/nonexistent/client.pem"},
            "CATGA_NATS_TLS_CERT and CATGA_NATS_TLS_KEY go together",
        ),
    ],
)
def test_settings_that_cannot_work_are_refused_before_connecting(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message) as raised:
        _transport(**fields)
    assert PASSWORD not in str(raised.value) and TOKEN not in str(raised.value)


def test_files_that_are_not_what_they_should_be(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_text("SUnot-a-seed-at-all\n")
    with pytest.raises(ConfigurationError, match="holds no nkey seed") as raised:
        _transport(nats_nkey_seed_file=str(garbage))
    assert "SUnot" not in str(raised.value)
    with pytest.raises(ConfigurationError, match="is no .creds file"):
        _transport(nats_creds_file=str(garbage))
    with pytest.raises(ConfigurationError, match="CATGA_NATS_TLS_CA: cannot load"):
        _transport(nats_tls_ca=str(garbage))
    pki = make_pki(tmp_path)
    with pytest.raises(ConfigurationError, match="CATGA_NATS_TLS_CERT/_KEY: cannot load"):
        _transport(nats_tls_cert=pki.client_cert, nats_tls_key=pki.client_cert)  # the key is the cert


def test_the_auth_never_shows_its_secrets() -> None:
    auth = NatsAuth(user="catga", password=SecretStr(PASSWORD), tls=TlsFiles(ca="/etc/ca.pem"))
    assert PASSWORD not in repr(auth) and "catga" in repr(auth)
    settings = CatgaSettings(nats_password=PASSWORD, nats_token=TOKEN)
    assert PASSWORD not in repr(settings) and TOKEN not in settings.model_dump_json()


# -- asking for TLS: a server without it gets no CONNECT, so no credentials ----------------------------


def _plaintext_server(directory: Path, *, port: int | None = None) -> tuple[NatsServer, Path]:
    """A nats-server with a password and no TLS, tracing each protocol line (CONNECT too) to a log."""
    config = directory / "plain.conf"
    config.write_text(f'authorization {{ user: catga, password: "{PASSWORD}" }}\n')
    log = directory / "plain.log"
    args = ["-c", str(config), "-DV", "-l", str(log)]
    return NatsServer(port=port, extra_args=args), log


def _connects(log: Path) -> int:
    return log.read_text().count("CONNECT {") if log.exists() else 0


@pytest.mark.parametrize(
    ("scheme", "files"), [("tls", True), ("tls", False), ("nats", True)], ids=["tls-url+ca", "tls-url", "ca"]
)
async def test_asking_for_tls_of_a_server_without_it_stops_start_up_before_the_credentials_go(
    scheme: str, files: bool, tmp_path: Path, pki: Pki, cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    server, log = _plaintext_server(tmp_path)
    with server:
        fields: dict[str, Any] = {
            "transport": "nats",
            "nats_url": f"{scheme}://127.0.0.1:{server.port}",
            "nats_user": "catga",
            "nats_password": PASSWORD,
        }
        if files:
            fields["nats_tls_ca"] = pki.ca
        error = await refused_at_start(cluster, fields, [PASSWORD], caplog, within=4)
        assert "did not offer TLS" in str(error) and f"127.0.0.1:{server.port}" in str(error)
        assert _connects(log) == 0, "the node sent its CONNECT (and password) over plaintext"
        # The server's trace does show a CONNECT when one is sent: the check above can fail.
        plain = NatsTransport(server.url, auth=NatsAuth(user="catga", password=SecretStr(PASSWORD)))
        await plain.connect()
        await plain.aclose()
        assert _connects(log) == 1


async def test_a_reconnect_to_a_server_that_lost_its_tls_sends_no_credentials(
    tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    config = (
        f'tls {{ cert_file: "{pki.server_cert}", key_file: "{pki.server_key}" }}\n'
        f'authorization {{ user: catga, password: "{PASSWORD}" }}\n'
    )
    secure = _server(tmp_path, config).start()
    auth = NatsAuth(user="catga", password=SecretStr(PASSWORD), tls=TlsFiles(ca=pki.ca))
    transport = NatsTransport(f"tls://127.0.0.1:{secure.port}", auth=auth, reconnect_wait=0.1)
    caplog.set_level(logging.DEBUG)
    try:
        await transport.connect()
        secure.close()
        await eventually(lambda: not transport.connected, within=10, message="the loss was not seen")
        # The same address comes back without TLS (a misconfigured restart, or someone in between).
        plain, log = _plaintext_server(tmp_path, port=secure.port)
        with plain:
            await eventually(
                lambda: "did not offer TLS" in caplog.text,
                within=10,
                message="the node never tried the plaintext server",
            )
            assert not transport.connected
            assert _connects(log) == 0, "the node sent its CONNECT (and password) over plaintext"
            assert PASSWORD not in caplog.text
    finally:
        await transport.aclose()
        secure.close()


async def test_a_stalled_tls_server_fails_publishes_in_time(tmp_path: Path, pki: Pki, cluster: str) -> None:
    """Over TLS the socket's transport is asyncio's SSL one, whose own buffer is what the senders
    wait on (`wire._drained` asks it through the public calls). It counts only what it has not
    passed on yet: the flusher's first write after the server stopped reading reaches the socket's
    buffer and does not make the senders wait, the next ones do."""
    big = b"x" * 500_000  # 60 of them: 30 MB for a server that reads nothing
    with _server(
        tmp_path, f'tls {{ cert_file: "{pki.server_cert}", key_file: "{pki.server_key}" }}\n'
    ) as server:
        tls = NatsAuth(tls=TlsFiles(ca=pki.ca, setting="CATGA_NATS_TLS"))
        transport = NatsTransport(
            f"tls://localhost:{server.port}", cluster=cluster, connect_timeout=0.5, auth=tls
        )
        await transport.connect()
        server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(TransportError, match="did not answer in time"):
                for _ in range(60):
                    await transport.publish("event.Big", Envelope({}, big))
                    await asyncio.sleep(0.01)  # the flusher writes
            assert time.monotonic() - started < 3.0
        finally:
            server.resume()
            await transport.aclose()


async def test_credentials_revoked_while_running_are_logged_with_the_settings_to_check(
    tmp_path: Path, pki: Pki, cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server reloads its configuration with another password (rotated there first): the node,
    reconnecting with the old one, says what to check, as it does at start-up."""
    made = _secured("password", tmp_path, pki)
    transport = create_transport(CatgaSettings(transport="nats", cluster=cluster, **made.right))
    try:
        await transport.connect()
        (tmp_path / "nats.conf").write_text('authorization { user: catga, password: "R0tated-pw-1" }\n')
        made.server.reload()
        await eventually(lambda: "CATGA_NATS_PASSWORD" in caplog.text, within=10, message="the hint")
        assert "refused the credentials" in caplog.text
        assert PASSWORD not in caplog.text
    finally:
        await transport.aclose()
        made.server.close()
