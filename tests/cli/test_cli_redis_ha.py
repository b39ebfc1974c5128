"""The CLI through Sentinel and on a Redis Cluster: the same CATGA_REDIS_URL as the nodes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fastapi_catga import CatgaSettings, build
from tests.cli import handlers
from tests.cli.conftest import TIMINGS, catga
from tests.redis_ha import redis_cluster, sentinel_setup
from tests.servers import debian_redis_7_binary

pytestmark = pytest.mark.redis


@pytest.fixture(params=["sentinel", "cluster"])
def url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "sentinel":
        setup = sentinel_setup()
        yield setup.url.replace("redis+sentinel://", "redis+sentinel://:S3cret-pw@")
        setup.close()
        return
    nodes = redis_cluster(debian_redis_7_binary())
    yield "redis+cluster://:S3cret-pw@" + ",".join(f"127.0.0.1:{node.port}" for node in nodes)
    for node in nodes:
        node.close()


async def test_nodes_and_health_through_an_ha_url(url: str) -> None:
    env = {"CATGA_TRANSPORT": "redis", "CATGA_REDIS_URL": url, "CATGA_CLUSTER": "clitest", **TIMINGS}
    # The servers set no password, so a URL with one is refused (AUTH fails): the nodes and the
    # CLI connect without it, and the refused URL shows that its password is never printed.
    plain = url.replace(":S3cret-pw@", "")
    settings = CatgaSettings(transport="redis", redis_url=plain, cluster="clitest", node_id="alpha",
                             heartbeat_interval=0.5, node_ttl=2)  # fmt: skip
    node = build(settings, handlers=[handlers])
    await node.start()
    try:
        shown = await catga("nodes", "--json", env={**env, "CATGA_REDIS_URL": plain})
        assert shown.code == 0, shown.err
        assert [record["node_id"] for record in shown.json()] == ["alpha"]
        health = await catga("health", "--json", env={**env, "CATGA_REDIS_URL": plain})
        assert health.code == 0 and health.json()["healthy"] is True, health.out + health.err

        refused = await catga("nodes", "--broker-timeout", "2", env=env)  # AUTH fails: no password set
        assert refused.code == 3
        assert "S3cret-pw" not in refused.out + refused.err and "***" in refused.err
    finally:
        await node.stop()
