"""Highly available Redis as production runs it: TLS on every port, client certificates asked for,
a password on the Redis servers and another one on the Sentinels. Real processes on loopback, all
Debian's redis-server 7.0 (built with TLS): three Sentinels over a primary and its replica
(``rediss+sentinel://``), and a 3-primary Redis Cluster (``rediss+cluster://``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastapi_catga import Catga, build
from fastapi_catga.transports.redis import RedisTransport
from tests.polling import eventually
from tests.redis_ha import HaSecurity, SentinelSetup, redis_cluster, sentinel_setup
from tests.secure import Pki, make_pki
from tests.servers import RedisServer, debian_redis_7_binary
from tests.transports.security import Ping, join_and_round_trip, pong, refused_at_start, settings

pytestmark = pytest.mark.redis

PASSWORD = "r3dis-HA-Pa55"
SENTINEL_PASSWORD = "s3ntinel-Pa55"
WRONG = "Wr0ng-" + SENTINEL_PASSWORD
SECRETS = [PASSWORD, SENTINEL_PASSWORD, WRONG]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def security(pki: Pki) -> HaSecurity:
    return HaSecurity(pki, PASSWORD, SENTINEL_PASSWORD)


def _fields(url: str, pki: Pki, **more: Any) -> dict[str, Any]:
    return {
        "transport": "redis",
        "redis_url": url,
        "redis_password": PASSWORD,
        "redis_tls_ca": pki.ca,
        "redis_tls_cert": pki.client_cert,
        "redis_tls_key": pki.client_key,
        **more,
    }


# -- Sentinel ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinels(security: HaSecurity) -> Iterator[SentinelSetup]:
    setup = sentinel_setup(security=security)
    yield setup
    setup.close()


async def test_nodes_meet_and_round_trip_through_tls_sentinels_that_ask_for_a_password(
    sentinels: SentinelSetup, pki: Pki, cluster: str
) -> None:
    assert sentinels.url.startswith("rediss+sentinel://")
    fields = _fields(sentinels.url, pki, redis_sentinel_password=SENTINEL_PASSWORD)
    await join_and_round_trip(cluster, fields)


async def test_tls_files_given_in_the_url_reach_the_sentinels_too(
    sentinels: SentinelSetup, pki: Pki, cluster: str
) -> None:
    files = f"ssl_ca_certs={pki.ca}&ssl_certfile={pki.client_cert}&ssl_keyfile={pki.client_key}"
    fields = {
        "transport": "redis",
        "redis_url": f"{sentinels.url}?{files}",
        "redis_password": PASSWORD,
        "redis_sentinel_password": SENTINEL_PASSWORD,
    }
    await join_and_round_trip(cluster, fields)


@pytest.mark.parametrize(
    ("given", "says"),
    [(WRONG, "refused the credentials"), ("", "asks for credentials")],
    ids=["wrong", "none"],
)
async def test_a_sentinel_password_refused_stops_start_up_and_names_the_setting(
    given: str, says: str, sentinels: SentinelSetup, pki: Pki, cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    fields = _fields(sentinels.url, pki, redis_sentinel_password=given)
    error = await refused_at_start(cluster, fields, SECRETS, caplog, within=4)
    assert says in str(error), str(error)
    assert "CATGA_REDIS_SENTINEL_PASSWORD" in str(error), str(error)
    assert f"127.0.0.1:{sentinels.sentinels[0].port}" in str(error), str(error)


async def test_a_sentinel_certificate_from_an_unknown_ca_is_refused(
    sentinels: SentinelSetup, pki: Pki, cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    fields = _fields(sentinels.url, pki, redis_sentinel_password=SENTINEL_PASSWORD, redis_tls_ca=pki.other_ca)
    error = await refused_at_start(cluster, fields, SECRETS, caplog, within=4)
    assert "CERTIFICATE_VERIFY_FAILED" in str(error), str(error)


async def test_plain_sentinel_url_to_tls_sentinels_is_refused_not_hung(
    sentinels: SentinelSetup, pki: Pki, cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = sentinels.url.replace("rediss+", "redis+")
    fields = {"transport": "redis", "redis_url": url, "redis_sentinel_password": SENTINEL_PASSWORD}
    error = await refused_at_start(cluster, fields, SECRETS, caplog, within=6)
    assert "none of 3 Sentinel(s)" in str(error), str(error)


async def test_a_failover_over_tls_takes_every_node_to_the_promoted_replica(
    security: HaSecurity, pki: Pki, cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "fastapi_catga.transports.redis")
    setup = sentinel_setup(security=security)
    nodes: list[Catga] = []
    try:
        fields = _fields(setup.url, pki, redis_sentinel_password=SENTINEL_PASSWORD)
        nodes = [
            build(settings(cluster, "b", fields), handlers=[pong]),
            build(settings(cluster, "a", fields), handlers=[]),
        ]
        for node in nodes:
            await node.start()
        caller = nodes[1]
        assert await caller.mediator.send(Ping(text="before")) == "pong before"

        setup.primary.kill()  # kill -9: the Sentinels promote the replica
        await eventually(
            lambda: setup.master_port() == setup.replica.port, within=30, message="the replica was promoted"
        )

        async def answered() -> bool:
            try:
                return await caller.mediator.send(Ping(text="after"), timeout=2) == "pong after"
            except Exception:
                return False

        await eventually(answered, within=30, message="a send round-trips over the promoted replica")
        for node in nodes:
            transport = node.node.transport
            assert isinstance(transport, RedisTransport) and transport.connected
        assert f"(now 127.0.0.1:{setup.replica.port})" in caplog.text
    finally:
        for node in reversed(nodes):
            await node.stop()
        setup.close()


# -- Redis Cluster -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_cluster(security: HaSecurity) -> Iterator[list[RedisServer]]:
    servers = redis_cluster(debian_redis_7_binary(), security=security)
    yield servers
    for server in servers:
        server.close()


async def test_nodes_meet_and_round_trip_on_a_tls_redis_cluster_with_a_password(
    tls_cluster: list[RedisServer], pki: Pki, cluster: str
) -> None:
    seeds = ",".join(f"127.0.0.1:{server.port}" for server in tls_cluster)
    await join_and_round_trip(cluster, _fields(f"rediss+cluster://{seeds}", pki))


async def test_a_plain_cluster_url_to_tls_nodes_is_refused_not_hung(
    tls_cluster: list[RedisServer], pki: Pki, cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis+cluster://:{PASSWORD}@127.0.0.1:{tls_cluster[0].port}"
    error = await refused_at_start(
        cluster, {"transport": "redis", "redis_url": url}, SECRETS, caplog, within=6
    )
    assert "no Redis Cluster node says who owns slot" in str(error), str(error)


async def test_a_client_certificate_the_cluster_refuses_stops_start_up_naming_the_tls_files(
    tls_cluster: list[RedisServer], pki: Pki, cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    key_body = Path(pki.other_client_key).read_text().splitlines()[1]
    url = f"rediss+cluster://127.0.0.1:{tls_cluster[0].port}"
    fields = _fields(url, pki, redis_tls_cert=pki.other_client_cert, redis_tls_key=pki.other_client_key)
    error = await refused_at_start(cluster, fields, [*SECRETS, key_body], caplog, within=6)
    assert "CATGA_REDIS_TLS_CA, CATGA_REDIS_TLS_CERT and CATGA_REDIS_TLS_KEY" in str(error), str(error)
