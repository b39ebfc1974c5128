"""The promises about the user's own work, on three uvicorn processes over each real broker.

A handler's own error runs it once; a routing key sticks under every routing strategy; an oversize
message gets the same answer on every node; a user's error class arrives as itself; a frozen
broker is an outage, not a mass death; one node id is one live process.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from tests.multiprocess.conftest import Broker, StartNodes
from tests.multiprocess.harness import AppNode
from tests.polling import wait_until

pytestmark = pytest.mark.multiprocess
APP = "tests.multiprocess.promises_app:app"
TTL = 3.0


def start(start_nodes: StartNodes, *names: str, **env: str) -> list[AppNode]:
    nodes = start_nodes(*names, env=env, app=APP)
    wait_until(lambda: all(n.view() == set(names) for n in nodes), within=2.0, message="views")
    return nodes


def runs(nodes: list[AppNode]) -> Counter[str]:
    total: Counter[str] = Counter()
    for node in nodes:
        total.update(node.get("/_test/runs"))
    return total


def test_one_outcome_on_every_node(start_nodes: StartNodes) -> None:
    nodes = start(start_nodes, "a", "b", "c", CATGA_ROUTING="local_first")
    a = nodes[0]
    for kind, expected in [("transport", "TransportError"), ("timeout", "RequestTimeoutError")]:
        answers = [a.post(f"/fail/{kind}").json() for _ in range(6)]
        counted = runs(nodes)
        for answer in answers:
            assert answer["caught"] == expected, answer
            assert counted[answer["id"]] == 1, f"{kind}: {answer['id']} ran {counted[answer['id']]} times"
            assert answer["elapsed"] < 1.0, "answered at once, not after the deadline"
    for target in nodes:  # a user's CatgaError subclass, raised on each node in turn
        answer = target.post("/fail/out-of-stock").json()
        assert (answer["caught"], answer["details"]) == ("OutOfStock", {"sku": "apple"})
    for key in [f"order-{i}" for i in range(8)]:
        ran_on = {node.post(f"/keyed/{key}").json() for node in nodes for _ in range(2)}
        assert len(ran_on) == 1, f"{key} ran on {ran_on} under local_first"
    for kind, expected in [
        ("cancelled", "RemoteHandlerError"), ("huge", "CatgaError"), ("long-name", "RemoteHandlerError"),
        ("exit", "RemoteHandlerError"), ("interrupt", "RemoteHandlerError"),
    ]:  # fmt: skip
        for name in ("a", "b"):  # here, and across the broker: answered once, at once
            answer = a.post(f"/fail/{kind}", params={"node": name}).json()
            assert answer["caught"] == expected, (kind, name, answer)
            assert runs(nodes)[answer["id"]] == 1 and answer["elapsed"] < 1.0, (kind, name, answer)
    for node in nodes:  # a handler's sys.exit() ended no process: each serves on
        assert node.process is not None and node.process.poll() is None, node.node_id
        assert node.get("/catga/health")["status"] == "ok", node.node_id
    limit = 1024 * 1024  # a result just under the limit, before the broker's correlation id: refused
    for name in ("a", "b"):  # alike here and across the broker, answered, never a timeout and a rerun
        assert a.post(f"/sized/{limit - 60}", params={"node": name}).status_code == 413, name
        assert a.post(f"/sized/{limit - 2000}", params={"node": name}).status_code == 200, name
    for node in nodes:  # 2 MB, over the 1 MB limit: refused whichever node the router would pick
        statuses = {node.post("/big", params={"size": 2_000_000}).status_code for _ in range(4)}
        assert statuses == {413}, (node.node_id, statuses)


def test_a_frozen_broker_is_an_outage_not_a_mass_death(broker: Broker, start_nodes: StartNodes) -> None:
    nodes = start(start_nodes, "a", "b", "c")
    remote_key = next(k for k in (f"k{i}" for i in range(100)) if nodes[0].post(f"/keyed/{k}").json() != "a")
    broker.server.pause()
    frozen = time.monotonic()
    try:
        started = time.monotonic()
        answer = nodes[0].post(f"/keyed/{remote_key}", params={"timeout": 1.5})
        took = time.monotonic() - started
        # Its node cannot answer; a retry may land on the asking node itself (200) or fail in time.
        assert answer.status_code in (200, 503, 504), answer.text
        assert took < 1.5 + 0.5, f"a send with a 1.5 s deadline took {took:.2f} s"
        wait_until(
            lambda: all(n.client.get("/catga/health").status_code == 503 for n in nodes),
            within=TTL + 1.5 - (time.monotonic() - frozen),
            message="503 while the broker is frozen",
        )
        while time.monotonic() - frozen < 5.0:  # frozen for longer than the TTL
            for node in nodes:
                assert node.view() == {"a", "b", "c"}, f"{node.node_id} evicted peers for the outage"
            time.sleep(0.2)
    finally:
        broker.server.resume()
    thawed = time.monotonic()

    def back() -> bool:
        healthy = all(n.client.get("/catga/health").status_code == 200 for n in nodes)
        return healthy and all(n.view() == {"a", "b", "c"} for n in nodes)

    wait_until(back, within=2.5, interval=0.05, message="back after the thaw")
    print(f"{broker.kind}: back {time.monotonic() - thawed:.2f} s after the thaw")
    assert nodes[1].post("/keyed/k").status_code == 200
    for node in nodes:
        assert "never retrieved" not in node.log.read_text(errors="replace")


def test_one_node_id_is_one_live_process(start_nodes: StartNodes) -> None:
    (a, b) = start(start_nodes, "a", "b")
    twin = AppNode("a", {**a.env}, app=APP)
    twin.start(wait=False)
    assert twin.process is not None
    twin.process.wait(timeout=20)
    assert twin.process.returncode != 0
    log = twin.log.read_text(errors="replace")
    assert "ConfigurationError" in log and "node id 'a' belongs to a live node" in log, log[-2000:]
    assert b.view() == {"a", "b"} and a.client.get("/catga/health").status_code == 200
    a.kill()
    killed = time.monotonic()
    again = AppNode("a", {**a.env}, app=APP).start(wait=False)
    try:
        wait_until(
            lambda: again.client.get("/catga/health").status_code == 200, within=TTL + 2, ignore=(Exception,)
        )
        print(f"restarted 'a' joined {time.monotonic() - killed:.2f} s after the kill")
        wait_until(lambda: b.view() == {"a", "b"} and again.view() == {"a", "b"}, within=1.0)
        assert b.post("/keyed/any").status_code == 200
    finally:
        again.close()
