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

from fastapi_catga import Catga, CatgaError, CatgaSettings, build
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
RATE = 500  # requests per second sent to the flooded node, without waiting for answers
HOLD = 1.0  # seconds each of them would hold a handler: an unlimited node would run RATE * HOLD at once
PAD = "x" * 32768  # bytes each request carries
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


class Load:
    """The load generator: an open-loop flood of node a, closed-loop traffic to the whole cluster,
    and a probe of a's memory and handler runs."""

    def __init__(self, generator: Catga, a: AppNode) -> None:
        self.mediator = generator.mediator
        self.a = a
        self.stop = asyncio.Event()
        self.flood: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self.rss: list[int] = []
        self.in_flight: list[int] = []

    async def run(self) -> None:
        tasks = [asyncio.create_task(self.flooder()), asyncio.create_task(self.measure())]
        tasks += [asyncio.create_task(self.caller()) for _ in range(TRAFFIC)]
        await asyncio.sleep(SECONDS)
        self.stop.set()
        await asyncio.gather(*tasks)

    async def flooder(self) -> None:  # open loop: the rate does not slow down when answers do
        sent: set[asyncio.Task[None]] = set()
        started = time.monotonic()
        while not self.stop.is_set():
            due = max(0, int((time.monotonic() - started) * RATE) - self.flood["sent"])
            for _ in range(due):
                sent.add(task := asyncio.create_task(self.flood_one()))
                task.add_done_callback(sent.discard)
            self.flood["sent"] += due
            await asyncio.sleep(0.01)
        await asyncio.gather(*sent)

    async def flood_one(self) -> None:
        try:
            await self.mediator.send_to_node(Slow(delay=HOLD, pad=PAD), "a")
            self.flood["accepted"] += 1
        except CatgaError as exc:
            self.flood[exc.code] += 1

    async def caller(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                await self.mediator.send(Slow(delay=0.05))
            except CatgaError as exc:
                self.errors.append(f"{exc.code}: {exc}")
            self.latencies.append(time.monotonic() - started)

    async def measure(self) -> None:
        while not self.stop.is_set():
            self.rss.append(rss_kib(self.a))
            stats = (await asyncio.to_thread(self.a.get, "/catga/health"))["stats"]
            self.in_flight.append(stats.get("in_flight", 0))
            await asyncio.sleep(0.2)


async def drive(generator: Catga, nodes: list[AppNode], observer: Failovers) -> dict[str, Any]:
    a = nodes[0]
    for _ in range(30):  # warm up every path before the "before" measure
        await generator.mediator.send(Slow())
    rss_before = rss_kib(a)
    load = Load(generator, a)
    await load.run()
    counts = {node.node_id: node.get("/_test/counts") for node in nodes}
    latencies = sorted(load.latencies)
    return {
        "flood": load.flood,
        "answered": len(latencies) - len(load.errors),
        "errors": load.errors,
        "p99": latencies[int(len(latencies) * 0.99) - 1],
        "max": latencies[-1],
        "failovers": dict(observer.seen),
        "busy_at_a": a.get("/catga/health")["stats"].get("busy", 0),
        "rss_before": rss_before,
        "rss_peak": max(load.rss),
        "in_flight_peak": max(load.in_flight),
        "counts": counts,
    }


def report(kind: str, f: dict[str, Any]) -> None:
    flood = f"[{kind}] flood of node a ({RATE}/s of {HOLD:g} s handlers for {SECONDS:g} s, limit {LIMIT}): "
    flood += str(dict(f["flood"]))
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
    flood = f["flood"]
    assert set(flood) <= {"sent", "accepted", "busy"}, "the flooded node answered each call: a result or busy"
    assert flood["accepted"] + flood["busy"] == flood["sent"]
    assert flood["busy"] > flood["accepted"] > 0
    assert f["failovers"].get("busy", 0) > 0, "sends that met a busy node moved on"
    assert f["in_flight_peak"] <= LIMIT
    assert f["rss_peak"] - f["rss_before"] < 20 * 1024, "the flooded node's memory stays flat"
    for counts in f["counts"].values():
        assert counts["started"] == counts["finished"], "nothing accepted was lost"
