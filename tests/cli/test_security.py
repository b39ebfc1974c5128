"""The CLI reads the brokers' credentials and TLS files from the same CATGA_* variables as the app:
it lists and reaches a node on a NATS with mutual TLS and an nkey, and on a Redis with TLS and an
ACL user; with a wrong secret it exits 3, saying what was refused, and never prints the secret."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nkeys
import pytest

from fastapi_catga import CatgaSettings, build
from tests.cli.conftest import catga
from tests.secure import Pki, TlsRedisServer, make_pki, new_nkey
from tests.servers import NatsServer, ServerProcess
from tests.transports.security import pong

PASSWORD = "cl1-Pa55-w0rd"
WRONG = "Wr0ng-" + PASSWORD


def _nats(directory: Path, pki: Pki) -> tuple[NatsServer, dict[str, str]]:
    seed, public = new_nkey(nkeys.PREFIX_BYTE_USER)
    (directory / "user.nk").write_bytes(seed)
    (directory / "nats.conf").write_text(
        f'tls {{ cert_file: "{pki.server_cert}", key_file: "{pki.server_key}", ca_file: "{pki.ca}", '
        f"verify: true }}\nauthorization {{ users: [ {{ nkey: {public} }} ] }}\n"
    )
    server = NatsServer(extra_args=["-c", str(directory / "nats.conf")]).start()
    return server, {
        "CATGA_TRANSPORT": "nats",
        "CATGA_NATS_URL": f"tls://localhost:{server.port}",
        "CATGA_NATS_NKEY_SEED_FILE": str(directory / "user.nk"),
        "CATGA_NATS_TLS_CA": pki.ca,
        "CATGA_NATS_TLS_CERT": pki.client_cert,
        "CATGA_NATS_TLS_KEY": pki.client_key,
    }


def _redis(pki: Pki) -> tuple[TlsRedisServer, dict[str, str]]:
    acl = ["--user", "default", "off", "--user", "ops", "on", f">{PASSWORD}", "~*", "&*", "+@all"]
    server = TlsRedisServer(pki, mutual=True, extra_args=acl).start()
    return server, {
        "CATGA_TRANSPORT": "redis",
        "CATGA_REDIS_URL": server.url,
        "CATGA_REDIS_USERNAME": "ops",
        "CATGA_REDIS_PASSWORD": PASSWORD,
        "CATGA_REDIS_TLS_CA": pki.ca,
        "CATGA_REDIS_TLS_CERT": pki.client_cert,
        "CATGA_REDIS_TLS_KEY": pki.client_key,
    }


@pytest.fixture(
    params=[pytest.param("nats", marks=pytest.mark.nats), pytest.param("redis", marks=pytest.mark.redis)]
)
def secured(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    pki = make_pki(tmp_path)
    server: ServerProcess
    server, env = _nats(tmp_path, pki) if request.param == "nats" else _redis(pki)
    try:
        yield {**env, "CATGA_CLUSTER": "securecli"}
    finally:
        server.close()


@pytest.fixture
async def node(secured: dict[str, str]) -> AsyncIterator[None]:
    fields = {key.removeprefix("CATGA_").lower(): value for key, value in secured.items()}
    settings = CatgaSettings.model_validate(
        {**fields, "node_id": "guarded", "heartbeat_interval": 0.5, "node_ttl": 3}
    )
    started = build(settings, handlers=[pong])
    await started.start()
    yield
    await started.stop()


async def test_the_cli_connects_with_the_same_settings(secured: dict[str, str], node: None) -> None:
    listed = await catga("nodes", "--json", env=secured)
    assert listed.code == 0, listed.err
    assert [record["node_id"] for record in listed.json()] == ["guarded"]
    answered = await catga("send", "Ping", '{"text": "cli"}', "--json", env=secured)
    assert answered.code == 0, answered.err
    assert "pong cli" in answered.out


async def test_a_wrong_secret_exits_3_and_is_never_printed(secured: dict[str, str]) -> None:
    if secured["CATGA_TRANSPORT"] == "nats":  # NATS: a seed the server does not know
        seed, _ = new_nkey(nkeys.PREFIX_BYTE_USER)
        stranger = Path(secured["CATGA_NATS_NKEY_SEED_FILE"]).with_name("stranger.nk")
        stranger.write_bytes(seed)
        wrong, secret = {**secured, "CATGA_NATS_NKEY_SEED_FILE": str(stranger)}, seed.decode()
    else:
        wrong, secret = {**secured, "CATGA_REDIS_PASSWORD": WRONG}, WRONG
    shown = await catga("-v", "health", env=wrong)
    assert shown.code == 3, (shown.out, shown.err)
    assert "refused the credentials" in shown.err
    assert secret not in shown.out + shown.err and PASSWORD not in shown.out + shown.err
