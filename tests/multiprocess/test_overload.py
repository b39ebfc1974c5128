"""One node of three flooded far beyond its handler limit, over a real broker: it answers "busy" at
once, the cluster's other traffic goes to the other nodes within its deadline, the flooded node's
memory stays flat, and every request a node accepted is answered."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastapi_catga import BusyError, Catga, CatgaError, CatgaSettings, build
from fastapi_catga.core.messages import Message
from fastapi_catga.core.observe import Observer
from tests.multiprocess.harness import AppNode
from tests.multiprocess.overload_app import Slow
from tests.multiprocess.test_cluster import views_complete
from tests.polling import eventually, wait_until
from tests.servers import NatsServer, RedisServer, ServerProcess

pytestmark = pytest.mark.multiprocess

APP = "tests.multiprocess.overload_app:app"
LIMIT = 20  # CATGA_MAX_IN_FLIGHT of every node
FLOOD = 300  # concurrent callers of the flooded node, each at once again after each answer
TRAFFIC = 12  # concurrent callers of the cluster as a whole
SECONDS = 4.0  # how long the flood lasts


class Failovers(Observer):
    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()

    def failover(self, message: Message, node_id: str, error: CatgaError) -> None:
        self.seen[error.code] += 1


@pytest.fixture(
    params=[pytest.param("nats", marks=pytest.mark.nats), pytest.param("redis", marks=pytest.mark.redis)]
)
def broker(request: pytest.FixtureRequest) -> Iterator[tuple[str, ServerProcess]]:
    server = (NatsServer() if request.param == "nats" else RedisServer()).start()
    try:
        yield request.param, server
    finally:
        server.close()


def rss_kib(node: AppNode) -> int:
    assert node.process is not None
    for line in Path(f"/proc/{node.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")


async def test_a_flooded_node_answers_busy_and_the_cluster_keeps_answering(
    broker: tuple[str, ServerProcess],
) -> None:
    kind, server = broker
    env = {
        "CATGA_TRANSPORT": kind,
        f"CATGA_{kind.upper()}_URL": server.url,
        "CATGA_MAX_IN_FLIGHT": str(LIMIT),
    }
    nodes = [AppNode(name, env, app=APP) for name in ("a", "b", "c")]
    try:
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            node.wait_ready(within=30)
        wait_until(lambda: views_complete(nodes, {"a", "b", "c"}), within=3.0)
        observer = Failovers()
        settings = CatgaSettings(
            transport=kind, nats_url=server.url, redis_url=server.url, node_id="loadgen",
            heartbeat_interval=1, node_ttl=3, request_timeout=3, retry_attempts=3,
        )  # fmt: skip
        generator = build(settings, handlers=[], observers=[observer])
        await generator.start()
        try:
            await eventually(lambda: len(generator.node.nodes()) == 4, within=3.0)
            figures = await drive(generator, nodes, observer)
        finally:
            await generator.stop()
        report(kind, figures)
        check(figures)
    finally:
        for node in nodes:
            node.close()


async def drive(generator: Catga, nodes: list[AppNode], observer: Failovers) -> dict[str, Any]:
    a = nodes[0]
    mediator = generator.mediator
    for _ in range(30):  # warm up every path before the "before" measure
        await mediator.send(Slow())
    rss_before = rss_kib(a)
    stop = asyncio.Event()
    flood: Counter[str] = Counter()
    latencies: list[float] = []
    errors: list[str] = []
    rss_during: list[int] = []
    in_flight_at_a: list[int] = []

    async def flooder() -> None:
        while not stop.is_set():
            try:
                await mediator.send_to_node(Slow(delay=0.5), "a")
                flood["accepted"] += 1
            except BusyError:
                flood["busy"] += 1
            except CatgaError as exc:
                flood[exc.code] += 1

    async def caller() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                await mediator.send(Slow(delay=0.05))
            except CatgaError as exc:
                errors.append(f"{exc.code}: {exc}")
            latencies.append(time.monotonic() - started)

    async def measure() -> None:
        while not stop.is_set():
            rss_during.append(rss_kib(a))
            stats = (await asyncio.to_thread(a.get, "/catga/health"))["stats"]
            in_flight_at_a.append(stats.get("in_flight", 0))
            await asyncio.sleep(0.2)

    tasks = [asyncio.create_task(flooder()) for _ in range(FLOOD)]
    tasks += [asyncio.create_task(caller()) for _ in range(TRAFFIC)]
    tasks.append(asyncio.create_task(measure()))
    await asyncio.sleep(SECONDS)
    stop.set()
    await asyncio.gather(*tasks)
    counts = {node.node_id: node.get("/_test/counts") for node in nodes}
    health = a.get("/catga/health")["stats"]
    latencies.sort()
    return {
        "flood": flood,
        "answered": len(latencies) - len(errors),
        "errors": errors,
        "p99": latencies[int(len(latencies) * 0.99) - 1],
        "max": latencies[-1],
        "failovers": dict(observer.seen),
        "busy_at_a": health.get("busy", 0),
        "rss_before": rss_before,
        "rss_peak": max(rss_during),
        "in_flight_peak": max(in_flight_at_a),
        "counts": counts,
    }


def report(kind: str, f: dict[str, Any]) -> None:
    flood = f"[{kind}] flood of node a ({FLOOD} callers, {SECONDS:g} s, limit {LIMIT}): {dict(f['flood'])}"
    print(
        f"\n{flood}; busy replies counted by a: {f['busy_at_a']}; "
        f"a's handler runs in flight at most {f['in_flight_peak']}"
        f"\n[{kind}] cluster traffic ({TRAFFIC} callers): {f['answered']} answered, "
        f"{len(f['errors'])} failed, p99 {f['p99'] * 1000:.0f} ms, max {f['max'] * 1000:.0f} ms; "
        f"failovers {f['failovers']}"
        f"\n[{kind}] a's RSS {f['rss_before'] / 1024:.1f} MiB before, {f['rss_peak'] / 1024:.1f} MiB at "
        f"most during the flood; handler runs per node {f['counts']}"
    )


def check(f: dict[str, Any]) -> None:
    assert not f["errors"], f["errors"][:5]
    assert f["max"] < 3.0, "every cluster send answered within its deadline"
    assert set(f["flood"]) <= {"accepted", "busy"}, "the flooded node answered each call: a result or busy"
    assert f["flood"]["busy"] > f["flood"]["accepted"] > 0
    assert f["failovers"].get("busy", 0) > 0, "sends that met a busy node moved on"
    assert f["in_flight_peak"] <= LIMIT
    assert f["rss_peak"] - f["rss_before"] < 20 * 1024, "the flooded node's memory stays flat"
    for counts in f["counts"].values():
        assert counts["started"] == counts["finished"], "nothing accepted was lost"
