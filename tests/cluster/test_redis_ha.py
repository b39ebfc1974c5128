"""Catga clusters on highly available Redis, real processes on loopback: a Sentinel failover under
load (kill -9 of the primary), and a 2-node cluster on a 3-primary Redis Cluster."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import MovedError

from fastapi_catga import Catga, CatgaError, CatgaSettings, build
from fastapi_catga.transports.redis import RedisTransport
from tests.cluster import workload
from tests.cluster.conftest import NodeTag
from tests.polling import eventually
from tests.redis_ha import MASTER, SentinelSetup, redis_cluster, sentinel_setup
from tests.servers import RedisServer, debian_redis_7_binary

pytestmark = pytest.mark.redis

logger = logging.getLogger(__name__)

#: The deadline of each send under load, and how late past it a send may end on a loaded machine.
SEND_TIMEOUT = 2.0
MARGIN = 1.0

StartNodes = Callable[[str, int], Awaitable[list[Catga]]]


@pytest.fixture
async def start_nodes() -> AsyncIterator[StartNodes]:
    """Start ``count`` catga nodes on ``url`` (cluster ``ha``); every one is stopped after the test."""
    started: list[Catga] = []

    async def start(url: str, count: int) -> list[Catga]:
        nodes = []
        for index in range(count):
            settings = CatgaSettings(
                transport="redis",
                redis_url=url,
                cluster="ha",
                node_id=f"n{index}",
                heartbeat_interval=0.5,
                node_ttl=3.0,
                request_timeout=SEND_TIMEOUT,
            )
            node = build(settings, handlers=[workload], behaviors=[NodeTag(f"n{index}")])
            await node.start()
            started.append(node)
            nodes.append(node)
        await eventually(lambda: all_see_all(nodes), within=10, message="every node sees every node")
        return nodes

    yield start
    for node in started:
        await node.stop()


def all_see_all(nodes: list[Catga]) -> bool:
    names = {node.settings.node_id for node in nodes}
    return all({info.node_id for info in node.node.nodes()} == names for node in nodes)


def connected(nodes: list[Catga]) -> bool:
    return all(isinstance(t := node.node.transport, RedisTransport) and t.connected for node in nodes)


# -- Sentinel failover -----------------------------------------------------------------------------


@pytest.fixture
def sentinels() -> Iterator[SentinelSetup]:
    setup = sentinel_setup()
    yield setup
    setup.close()


@dataclass
class Sent:
    started: float
    took: float
    error: str | None  # the error's class name, or None for a success


async def keep_sending(sender: Catga, targets: list[str], sent: list[Sent], stop: asyncio.Event) -> None:
    """Send `Work` to each target in turn, each send bounded by its deadline, until ``stop``."""
    turn = 0
    while not stop.is_set():
        target = targets[turn % len(targets)]
        turn += 1
        started = time.monotonic()
        try:
            assert await sender.mediator.send_to_node(workload.Work(), target, timeout=SEND_TIMEOUT) == target
            error = None
        except CatgaError as exc:
            error = type(exc).__name__
        sent.append(Sent(started, time.monotonic() - started, error))
        if error is not None:
            await asyncio.sleep(0.05)  # a failing send is fast: do not spin


async def test_a_sentinel_failover_under_load_reconnects_every_node_to_the_promoted_replica(
    sentinels: SentinelSetup, start_nodes: StartNodes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "fastapi_catga.transports.redis.reader")
    nodes = await start_nodes(sentinels.url, 3)
    sent: list[Sent] = []
    stop = asyncio.Event()
    names = [node.settings.node_id for node in nodes]
    senders = [
        asyncio.create_task(keep_sending(node, [n for n in names if n != node.settings.node_id], sent, stop))
        for node in nodes
        for _ in range(3)  # three senders per node
    ]
    try:
        await eventually(lambda: sum(s.error is None for s in sent) >= 100, within=10, message="warm up")
        assert all(s.error is None for s in sent), Counter(s.error for s in sent)

        sentinels.primary.kill()  # kill -9
        killed = time.monotonic()
        await eventually(lambda: not connected(nodes), within=5, message="the nodes saw the primary go")
        await eventually(lambda: connected(nodes), within=30, message="every node reconnected")
        reconnected = time.monotonic() - killed
        await eventually(lambda: all_see_all(nodes), within=10, message="every view is whole again")
        whole = time.monotonic() - killed
        assert sentinels.master_port() == sentinels.replica.port  # the replica was promoted
        assert caplog.text.count(f"(now 127.0.0.1:{sentinels.replica.port})") == len(nodes)

        after = time.monotonic()
        await eventually(
            lambda: sum(s.error is None and s.started > after for s in sent) >= 100,
            within=10,
            message="sends succeed again",
        )
    finally:
        stop.set()
        await asyncio.gather(*senders)

    late = [s for s in sent if s.took > SEND_TIMEOUT + MARGIN]
    assert not late, (
        f"{len(late)} sends outlived their deadline, the worst by {max(s.took for s in late):.2f} s"
    )
    failed = Counter(s.error for s in sent if s.error is not None)
    during = [s for s in sent if s.started >= killed]
    logger.warning(
        "sentinel failover: reconnected %.2f s after kill -9, views whole at %.2f s; %d sends, %d failed "
        "(%s), each within %.2f s (deadline %.1f s)",
        reconnected,
        whole,
        len(during),
        sum(failed.values()),
        dict(failed),
        max(s.took for s in sent),
        SEND_TIMEOUT,
    )
    recovered = [s for s in sent if s.started > after]  # sent once every view was whole again
    assert all(s.error is None for s in recovered), Counter(s.error for s in recovered)


async def test_a_manual_failover_is_followed_before_sentinel_closes_the_old_masters_clients(
    sentinels: SentinelSetup, start_nodes: StartNodes, caplog: pytest.LogCaptureFixture
) -> None:
    """``SENTINEL FAILOVER``: the old master stays up, a master still, its clients connected until
    Sentinel demotes it some 10 s later. Each node asks the Sentinels every 5 s (the transport's
    health-check interval) and moves at once when the master changed."""
    caplog.set_level(logging.INFO, "fastapi_catga.transports.redis")
    nodes = await start_nodes(sentinels.url, 2)
    with redis.Redis(port=sentinels.sentinels[0].port) as sentinel:
        run(sentinel, "SENTINEL", "FAILOVER", MASTER)
    await eventually(lambda: sentinels.master_port() == sentinels.replica.port, within=15, message="switched")
    switched = time.monotonic()

    moved = f"(now 127.0.0.1:{sentinels.replica.port})"
    await eventually(lambda: caplog.text.count(moved) == len(nodes), within=8, message="every node moved")
    logger.warning("followed a manual failover %.2f s after the switch", time.monotonic() - switched)
    assert caplog.text.count("Redis moved from") == len(nodes)
    await eventually(lambda: connected(nodes) and all_see_all(nodes), within=10, message="views whole")
    assert await nodes[0].mediator.send_to_node(workload.Work(), "n1") == "n1"


async def test_a_master_demoted_behind_the_nodes_backs_is_left_at_the_next_refused_write(
    sentinels: SentinelSetup, start_nodes: StartNodes, caplog: pytest.LogCaptureFixture
) -> None:
    """A manual failover, with the old master demoted at once by hand (``REPLICAOF``): no client
    connection is closed, as when an operator or a partition's end demotes it. The nodes' next
    heartbeat is refused (``READONLY``), and each node locates the new master."""
    caplog.set_level(logging.INFO, "fastapi_catga.transports.redis.reader")
    nodes = await start_nodes(sentinels.url, 2)
    with redis.Redis(port=sentinels.sentinels[0].port) as sentinel:
        run(sentinel, "SENTINEL", "FAILOVER", MASTER)
    await eventually(lambda: sentinels.master_port() == sentinels.replica.port, within=15, message="switched")
    with redis.Redis(port=sentinels.primary.port) as old:
        run(old, "REPLICAOF", "127.0.0.1", sentinels.replica.port)
    demoted = time.monotonic()

    # Sentinel would close the old master's clients itself, but only some 10 s later.
    moved = f"(now 127.0.0.1:{sentinels.replica.port})"
    await eventually(lambda: caplog.text.count(moved) == len(nodes), within=4, message="every node moved")
    logger.warning("left the demoted master %.2f s after REPLICAOF", time.monotonic() - demoted)
    await eventually(lambda: connected(nodes) and all_see_all(nodes), within=10, message="views whole")
    assert await nodes[0].mediator.send_to_node(workload.Work(), "n1") == "n1"
    assert await nodes[1].mediator.send_to_node(workload.Work(), "n0") == "n0"
    with redis.Redis(port=sentinels.primary.port) as old:
        assert run(old, "PUBSUB", "NUMSUB", "catga:{ha}:node.n0") == [b"catga:{ha}:node.n0", 0]


# -- Redis Cluster -------------------------------------------------------------------------------


@pytest.fixture
def cluster_nodes() -> Iterator[list[RedisServer]]:
    nodes = redis_cluster(debian_redis_7_binary())
    yield nodes
    for node in nodes:
        node.close()


async def test_a_catga_cluster_on_a_redis_cluster_sends_publishes_and_broadcasts(
    cluster_nodes: list[RedisServer], start_nodes: StartNodes
) -> None:
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in cluster_nodes)
    a, b = await start_nodes(url, 2)  # every node sees every node: membership works

    assert await a.mediator.send_to_node(workload.Work(), "n1") == "n1"
    assert await b.mediator.send_to_node(workload.Work(), "n0") == "n0"
    results: Counter[Any] = Counter([await a.mediator.send(workload.Work()) for _ in range(10)])
    assert set(results) == {"n0", "n1"}  # round robin over both

    event = workload.Happened(what="x")
    await a.mediator.publish(event)
    expected = {(node, event.message_id) for node in ("n0", "n1", "n0/2", "n1/2")}
    await eventually(
        lambda: expected <= set(workload.events_seen), within=5, message="both nodes ran the event"
    )

    assert await a.mediator.broadcast(workload.Work()) == {"n0": "n0", "n1": "n1"}


async def test_a_catga_cluster_follows_its_slot_to_another_shard(
    cluster_nodes: list[RedisServer], start_nodes: StartNodes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "fastapi_catga.transports.redis.reader")
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in cluster_nodes)
    a, b = await start_nodes(url, 2)
    source, target = move_slot(cluster_nodes, key_slot(b"ha"))

    # MOVED (membership commands) or sunsubscribe (sharded pub/sub) makes each node reconnect there.
    await eventually(
        lambda: caplog.text.count(f"(now 127.0.0.1:{target})") >= 2, within=10, message="both nodes moved"
    )
    await eventually(lambda: connected([a, b]) and all_see_all([a, b]), within=10, message="views whole")
    assert await a.mediator.send_to_node(workload.Work(), "n1") == "n1"
    assert await b.mediator.send_to_node(workload.Work(), "n0") == "n0"
    async with aioredis.Redis(port=source) as old, aioredis.Redis(port=target) as new:
        assert await old.pubsub_shardchannels("catga:*") == []
        assert len(await new.pubsub_shardchannels("catga:*")) >= 4  # two nodes, two inboxes, events


async def test_a_redis_cluster_failover_moves_the_catga_cluster_to_the_promoted_replica(
    start_nodes: StartNodes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "fastapi_catga.transports.redis.reader")
    servers = redis_cluster(debian_redis_7_binary(), replicas=1)
    try:
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{server.port}" for server in servers)
        a, b = await start_nodes(url, 2)
        owner = owner_port(servers, "ha")
        next(server for server in servers if server.port == owner).kill()  # kill -9
        killed = time.monotonic()

        moved = re.compile(r"\(now 127\.0\.0\.1:(\d+)\)")
        await eventually(lambda: len(moved.findall(caplog.text)) >= 2, within=30, message="both nodes moved")
        assert owner not in {int(port) for port in moved.findall(caplog.text)}
        await eventually(lambda: connected([a, b]) and all_see_all([a, b]), within=10, message="views whole")
        logger.warning(
            "redis cluster failover: both nodes back %.2f s after kill -9", time.monotonic() - killed
        )
        assert await a.mediator.send_to_node(workload.Work(), "n1") == "n1"
        assert await b.mediator.send_to_node(workload.Work(), "n0") == "n0"
    finally:
        for server in servers:
            server.close()


def owner_port(nodes: list[RedisServer], cluster: str) -> int:
    """The port of the primary that owns ``cluster``'s slot (the others answer MOVED)."""
    with redis.Redis(port=nodes[0].port) as client:
        try:
            client.get(f"catga:{{{cluster}}}:probe")
        except MovedError as exc:
            return int(exc.port)
    return nodes[0].port


#: redis-py leaves it without types.
run: Callable[..., Any] = redis.Redis.execute_command


def move_slot(nodes: list[RedisServer], slot: int) -> tuple[int, int]:
    """Migrate ``slot`` (and its keys) from its owner to another primary, as ``redis-cli --cluster
    reshard`` does; return both ports."""
    clients = {node.port: redis.Redis(port=node.port, decode_responses=True) for node in nodes}
    try:
        source = owner_port(nodes, "ha")
        target = next(port for port in clients if port != source)
        ids = {port: str(run(client, "CLUSTER", "MYID")) for port, client in clients.items()}
        run(clients[target], "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        run(clients[source], "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        while keys := run(clients[source], "CLUSTER", "GETKEYSINSLOT", slot, 100):
            run(clients[source], "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        for port in sorted(clients, key=lambda port: port != target):  # the new owner first
            run(clients[port], "CLUSTER", "SETSLOT", slot, "NODE", ids[target])
    finally:
        for client in clients.values():
            client.close()
    return source, target
