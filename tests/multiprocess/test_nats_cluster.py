"""App nodes spread over a three-server NATS cluster keep working when one server dies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.multiprocess.harness import AppNode
from tests.multiprocess.test_cluster import check_load, drive_load, views_complete
from tests.polling import wait_until
from tests.servers import NatsServer, nats_cluster

pytestmark = [pytest.mark.multiprocess, pytest.mark.nats]


@pytest.fixture
def servers() -> Iterator[list[NatsServer]]:
    cluster = nats_cluster(3)
    yield cluster
    for server in cluster:
        server.close()


@pytest.fixture
def nodes(servers: list[NatsServer]) -> Iterator[list[AppNode]]:
    urls = ",".join(server.url for server in servers)
    made = [AppNode(name, {"CATGA_TRANSPORT": "nats", "CATGA_NATS_URL": urls}) for name in ("a", "b", "c")]
    for node in made:
        node.start(wait=False)
    for node in made:
        node.wait_ready(within=30)
    yield made
    for node in made:
        node.close()


async def test_losing_one_nats_server_fails_no_request_and_evicts_nobody(
    servers: list[NatsServer], nodes: list[AppNode]
) -> None:
    wait_until(lambda: views_complete(nodes, {"a", "b", "c"}), within=2.0)
    stop, results = asyncio.Event(), list[tuple[int, Any]]()
    load = asyncio.create_task(drive_load(nodes[0], stop, results))
    await asyncio.sleep(1.0)
    killed_at = time.monotonic()
    servers[0].kill()
    # Longer than the TTL: a node whose server died reconnects to another, and the membership
    # bucket (three replicas) lives on, so nobody may be evicted.
    while time.monotonic() < killed_at + 4.0:
        if not views_complete(nodes, {"a", "b", "c"}):
            report(nodes)
            raise AssertionError(f"a node was evicted {time.monotonic() - killed_at:.2f} s after the kill")
        await asyncio.sleep(0.2)
    stop.set()
    await load
    served, _ = check_load(results)
    assert set(served) == {"a", "b", "c"}
    try:
        wait_until(lambda: all(n.client.get("/catga/health").status_code == 200 for n in nodes), within=10.0)
    except AssertionError:
        report(nodes)
        raise


def report(nodes: list[AppNode]) -> None:
    for node in nodes:
        print(node.node_id, node.view(), node.client.get("/catga/health").json(), node.log_tail(15), sep="\n")
