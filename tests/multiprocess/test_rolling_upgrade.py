"""A rolling upgrade over nats-server 2.15: uvicorn processes of two versions of one app side by side.

The v1 version of ``Greet`` has ``name``; ``v2-optional`` adds a field with a default (compatible),
``v2-required`` adds a required one (incompatible for a v1 sender). A v1 sender never routes
``Greet`` to the ``v2-required`` node, says so in ``/catga/nodes`` and once in its log, and gets a
clear 503 once no compatible node is left.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.multiprocess.conftest import StartNodes
from tests.multiprocess.harness import AppNode
from tests.polling import wait_until

pytestmark = pytest.mark.multiprocess
APP = "tests.multiprocess.upgrade_app:app"
WARNING = "node v2req (app 2.0) has an incompatible Greet schema"


def version(schema: str, app_version: str, *, handles: bool = True) -> dict[str, str]:
    return {
        "UPGRADE_SCHEMA": schema,
        "UPGRADE_HANDLES": "1" if handles else "0",
        "CATGA_APP_VERSION": app_version,
    }


def served(node: AppNode, sends: int) -> Counter[str]:
    answers = [node.post("/greet") for _ in range(sends)]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    return Counter(a.json()["node"] for a in answers)


@pytest.mark.parametrize("broker", ["nats"], indirect=True)
def test_v1_and_v2_nodes_side_by_side(start_nodes: StartNodes) -> None:
    (caller,) = start_nodes("caller", env=version("v1", "1.0", handles=False), app=APP)
    (v1,) = start_nodes("v1", env=version("v1", "1.0"), app=APP)
    (v2opt,) = start_nodes("v2opt", env=version("v2-optional", "2.1"), app=APP)
    (v2req,) = start_nodes("v2req", env=version("v2-required", "2.0"), app=APP)
    everyone = {"caller", "v1", "v2opt", "v2req"}
    wait_until(lambda: all(n.view() == everyone for n in (caller, v1, v2opt, v2req)), within=5.0)

    # v1 senders: the compatible v2 node takes its share, the incompatible one none.
    assert set(served(caller, 12)) == {"v1", "v2opt"}
    assert set(served(v1, 12)) == {"v1", "v2opt"}
    # The v2-required sender writes every field the others read: it may use them all.
    assert set(served(v2req, 18)) == {"v1", "v2opt", "v2req"}

    listed = {n["node_id"]: n for n in caller.get("/catga/nodes")}
    assert listed["v2req"]["app_version"] == "2.0" and listed["v2opt"]["app_version"] == "2.1"
    assert listed["v2req"]["incompatible"] == {
        "Greet": "message field 'title': required on node v2req, absent on this node"
    }
    assert listed["v2opt"]["incompatible"] == {} and listed["v1"]["incompatible"] == {}
    assert "Greet" in listed["v2req"]["schemas"]
    assert caller.log.read_text().count(WARNING) == 1  # once, for all those sends

    v1.terminate()
    v2opt.terminate()
    wait_until(lambda: caller.view() == {"caller", "v2req"}, within=5.0)
    refused = caller.post("/greet")
    assert refused.status_code == 503
    assert refused.headers["content-type"] == "application/problem+json"
    problem = refused.json()
    assert problem["type"] == "urn:catga:error:incompatible_schema"
    assert "no node with a compatible Greet schema" in problem["detail"]
    assert problem["details"] == {
        "v2req": ["message field 'title': required on node v2req, absent on this node"]
    }
    assert caller.log.read_text().count(WARNING) == 1
