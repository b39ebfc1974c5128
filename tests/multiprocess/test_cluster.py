"""Three uvicorn processes of one app, over a real broker, behave as one cluster.

Timings are short (heartbeat 1 s, TTL 3 s, request deadline 3 s over 3 attempts); every wait is a
polling deadline, and the elapsed times are asserted against the targets in DESIGN.md.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.multiprocess.conftest import Broker, StartNodes
from tests.multiprocess.harness import AppNode
from tests.polling import eventually, wait_until

pytestmark = pytest.mark.multiprocess
TTL = 3.0
ATTEMPT_TIMEOUT = 1.0  # CATGA_REQUEST_TIMEOUT 3 s over CATGA_RETRY_ATTEMPTS 3


def views_complete(nodes: list[AppNode], expected: set[str]) -> bool:
    return all(node.view() == expected for node in nodes)


def test_views_routing_broadcast_and_publish(start_nodes: StartNodes) -> None:
    nodes = start_nodes("a", "b", "c")
    a, b, c = nodes
    elapsed = wait_until(lambda: views_complete(nodes, {"a", "b", "c"}), within=1.0, message="views")
    print(f"views complete {elapsed:.3f} s after the last node was ready")
    listed = {n["node_id"]: n for n in a.get("/catga/nodes")}
    assert listed["b"]["endpoint"] == b.url
    assert listed["b"]["metadata"] == {"role": "test", "name": "b"}
    assert "Work" in listed["c"]["handles"] and "Ping" in listed["c"]["events"]
    assert a.get("/catga/nodes/current")["node_id"] == "a"

    (late,) = start_nodes("late")
    assert late.view() == {"a", "b", "c", "late"}  # a late joiner sees everyone before it serves
    wait_until(lambda: views_complete(nodes, {"a", "b", "c", "late"}), within=1.0, message="late join")

    served = Counter(a.post("/work").json()["node"] for _ in range(40))
    assert set(served) == {"a", "b", "c", "late"}, served
    assert a.post("/work/c").json() == {"node": "c"}
    missing = a.post("/work/nobody")
    assert missing.status_code == 503
    assert missing.headers["content-type"] == "application/problem+json"
    assert b.post("/broadcast").json() == {"a": "a", "b": "b", "c": "c", "late": "late"}

    event_id = c.post("/publish").json()["message_id"]
    everyone = [*nodes, late]
    wait_until(lambda: all(event_id in n.get("/_test/executions")["events"] for n in everyone), within=1.0)


async def test_graceful_stop_drains_work_and_leaves_every_view_within_a_second(
    start_nodes: StartNodes,
) -> None:
    nodes = start_nodes("a", "b", "c")
    a, _, c = nodes
    wait_until(lambda: views_complete(nodes, {"a", "b", "c"}), within=1.0)
    runs_on_c = len(c.get("/_test/executions")["executions"])
    async with httpx.AsyncClient(base_url=a.url, timeout=15) as client:
        in_flight = asyncio.create_task(client.post("/work/c", params={"delay": 1.0}))
        # c is told to stop only once its handler has started the work (and before it ends).
        await eventually(
            lambda: len(c.get("/_test/executions")["executions"]) > runs_on_c,
            within=1.0,
            message="the work started on c",
        )
        assert not in_flight.done()
        started = time.monotonic()
        c.signal(signal.SIGTERM)
        elapsed = wait_until(lambda: views_complete(nodes[:2], {"a", "b"}), within=1.0, message="leave")
        print(
            f"graceful leave seen by every peer in {time.monotonic() - started:.3f} s (poll {elapsed:.3f} s)"
        )
        answer = await in_flight
    assert answer.status_code == 200, answer.text  # c finished the work it had before it left
    assert answer.json() == {"node": "c"}


async def drive_load(
    node: AppNode, stop: asyncio.Event, results: list[tuple[int, Any]], workers: int = 4
) -> None:
    """Send work through ``node`` from ``workers`` concurrent clients until ``stop`` is set."""
    async with httpx.AsyncClient(base_url=node.url, timeout=15) as client:

        async def worker() -> None:
            while not stop.is_set():
                started = time.monotonic()
                response = await client.post("/work", params={"delay": 0.01})
                body = response.json()
                if isinstance(body, dict):
                    body["latency"] = time.monotonic() - started
                results.append((response.status_code, body))

        await asyncio.gather(*(worker() for _ in range(workers)))


def check_load(results: list[tuple[int, Any]]) -> tuple[Counter[str], float]:
    """Assert that every request of a load run succeeded; return who served them and the slowest one."""
    failures = [r for r in results if r[0] != 200]
    served = Counter(r[1]["node"] for r in results if r[0] == 200)
    slowest = max(r[1]["latency"] for r in results)
    print(
        f"{len(results)} requests, {len(failures)} failed, slowest {slowest:.3f} s, served by {dict(served)}"
    )
    assert not failures, failures[:5]
    return served, slowest


async def test_kill_9_of_a_serving_node_fails_no_request(start_nodes: StartNodes) -> None:
    nodes = start_nodes("a", "b", "c")
    a, _, c = nodes
    wait_until(lambda: views_complete(nodes, {"a", "b", "c"}), within=1.0)
    stop, results = asyncio.Event(), list[tuple[int, Any]]()
    load = asyncio.create_task(drive_load(a, stop, results))
    await asyncio.sleep(1.0)  # let c serve its share before it dies
    killed_at = time.monotonic()
    c.kill()
    await asyncio.sleep(2.0)  # keep the load going through the failover
    stop.set()
    await load
    served, slowest = check_load(results)
    # A request caught in flight by the kill waits out its attempt (deadline 3 s / 3 attempts), then
    # succeeds elsewhere: DESIGN's target is attempt timeout + 0.5 s.
    assert slowest <= ATTEMPT_TIMEOUT + 0.5
    assert served["c"] > 0
    wait_until(lambda: views_complete(nodes[:2], {"a", "b"}), within=TTL + 2 - (time.monotonic() - killed_at))
    print(f"kill -9 evicted from every view {time.monotonic() - killed_at:.3f} s after the kill")


async def test_paused_node_fails_no_request_and_runs_nothing_stale(start_nodes: StartNodes) -> None:
    nodes = start_nodes("a", "b", "c")
    a, _, c = nodes
    wait_until(lambda: views_complete(nodes, {"a", "b", "c"}), within=1.0)
    stop, results = asyncio.Event(), list[tuple[int, Any]]()
    load = asyncio.create_task(drive_load(a, stop, results))
    await asyncio.sleep(1.0)
    c.pause()
    await asyncio.sleep(1.5)  # shorter than TTL - heartbeat: c must not be evicted
    c.resume()
    resumed_at = time.time()
    await asyncio.sleep(1.5)
    stop.set()
    await load
    _, slowest = check_load(results)
    assert slowest <= ATTEMPT_TIMEOUT + 0.5
    runs: dict[str, list[tuple[str, float]]] = {}
    for node in nodes:
        for message_id, starts in node.get("/_test/executions")["executions"].items():
            runs.setdefault(message_id, []).extend((node.node_id, started) for started in starts)
    stale = [
        (m, r) for m, r in runs.items() if len(r) > 1 and any(n == "c" and t >= resumed_at for n, t in r)
    ]
    assert not stale, f"c ran requests that had already been retried elsewhere: {stale[:3]}"
    health = c.get("/catga/health")
    print(f"c dropped {health['stats'].get('expired_dropped', 0)} expired request(s) after resuming")
    assert health["stats"].get("expired_dropped", 0) >= 1
    assert views_complete(nodes, {"a", "b", "c"})


def test_broker_restart_evicts_nobody_and_recovers_within_two_seconds(
    broker: Broker, start_nodes: StartNodes
) -> None:
    nodes = start_nodes("a", "b", "c")
    wait_until(lambda: views_complete(nodes, {"a", "b", "c"}), within=1.0)
    broker.server.kill()
    wait_until(lambda: all(n.client.get("/catga/health").status_code == 503 for n in nodes), within=2.0)
    outage_end = time.monotonic() + TTL + 1.0  # longer than the TTL: nobody may be evicted for it
    while time.monotonic() < outage_end:
        assert views_complete(nodes, {"a", "b", "c"})
        time.sleep(0.2)
    broker.server.restart()
    back = time.monotonic()

    def recovered() -> bool:
        healthy = all(n.client.get("/catga/health").status_code == 200 for n in nodes)
        return (
            healthy
            and views_complete(nodes, {"a", "b", "c"})
            and all(nodes[0].post(f"/work/{n.node_id}").status_code == 200 for n in nodes)
        )

    wait_until(recovered, within=2.0, interval=0.05, message="recovery after broker restart")
    print(f"{broker.kind}: recovered {time.monotonic() - back:.3f} s after the broker came back")
