"""``catga nodes`` and ``catga watch`` see app nodes that run as separate uvicorn processes."""

from __future__ import annotations

import json

import pytest

from tests.cli.conftest import Broker, Lines, catga, spawn
from tests.multiprocess.harness import AppNode

pytestmark = pytest.mark.multiprocess


async def test_nodes_lists_uvicorn_nodes_and_watch_sees_one_killed(broker: Broker) -> None:
    apps = [AppNode(name, broker.env) for name in ("proc-a", "proc-b")]
    try:
        for app in apps:
            app.start(wait=False)
        for app in apps:
            app.wait_ready()

        listed = await catga("nodes", "--json", env=broker.env)
        assert listed.code == 0, listed.err
        records = {record["node_id"]: record for record in listed.json()}
        assert set(records) == {"proc-a", "proc-b"}
        for app in apps:
            record = records[app.node_id]
            assert (
                record["endpoint"] == app.url
                and record["handles"] == ["Work"]
                and record["events"] == ["Ping"]
            )
            assert record["metadata"] == {"role": "test", "name": app.node_id}
        assert records["proc-a"]["incarnation"] != records["proc-b"]["incarnation"]

        process = await spawn("watch", "--json", env=broker.env)
        lines = Lines(process)
        try:
            await lines.until(lambda line: '"present"' in line and '"proc-b"' in line)
            apps[1].kill()  # kill -9: no goodbye; the record expires (TTL 2 s)
            left = json.loads(await lines.until(lambda line: '"leave"' in line, within=20))
            assert left["node_id"] == "proc-b"
            # NATS 2.11+ announces the expiry (unless the watch's next read of the store sees it first);
            # Redis does not, and the watch's next read finds the record gone.
            expected = {"record expired"} if broker.kind == "redis" else {"record removed", "record expired"}
            assert left["reason"] in expected
        finally:
            code = await lines.interrupt()
        assert code == 0
        assert "proc-a" in (await catga("nodes", env=broker.env)).out
    finally:
        for app in apps:
            app.close()
