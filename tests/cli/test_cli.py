"""``catga`` against real nats-server and redis-server processes, with nodes started in this process."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from unittest.mock import ANY

import pytest

from tests.cli.conftest import Broker, Lines, Nodes, catga, cli_env, spawn
from tests.cli.handlers import Charge, charged, rejecting
from tests.polling import eventually

MEMORY_SAYS = "the in-memory transport lives inside one app process"


async def test_nodes_lists_the_live_members(broker: Broker, nodes: Nodes) -> None:
    await nodes.start("alpha")
    await nodes.start("beta")

    shown = await catga("nodes", env=broker.env)
    assert shown.code == 0, shown.err
    header, *rows = shown.out.splitlines()
    assert header.split() == ["NODE", "ENDPOINT", "VERSION", "HANDLES", "EVENTS", "LAST", "SEEN", "STARTED"]
    assert rows[0].startswith("alpha  ") and rows[1].startswith("beta  ")
    assert "http://alpha.test:8000" in rows[0] and "Charge,Explode,Greet,Reserve" in rows[0]
    assert "Noted" in rows[0] and "s ago" in rows[0]
    assert f"2 node(s) in cluster 'clitest' on {broker.kind}" in shown.out

    listed = await catga("nodes", "--json", env=broker.env)
    assert listed.code == 0, listed.err
    records = listed.json()
    assert [record["node_id"] for record in records] == ["alpha", "beta"]
    assert records[0]["handles"] == ["Charge", "Explode", "Greet", "Reserve"]
    assert records[0]["events"] == ["Noted"]
    assert {"endpoint", "last_seen", "started_at", "version", "metadata", "incarnation"} <= set(records[0])

    elsewhere = await catga("nodes", "--cluster", "other", env=broker.env)
    assert elsewhere.code == 0 and elsewhere.out.startswith("no live nodes in cluster 'other'")
    url = f"--{broker.kind}-url"
    by_options = await catga("--json", "nodes", "--transport", broker.kind, url, broker.server.url,
                             "--cluster", "clitest", env={"CATGA_CLUSTER": "other"})  # fmt: skip
    assert [record["node_id"] for record in by_options.json()] == ["alpha", "beta"]


async def test_watch_prints_the_table_then_stops_after_its_time(broker: Broker, nodes: Nodes) -> None:
    await nodes.start("alpha")
    watched = await catga("watch", "--for", "1.5", env=broker.env)
    assert watched.code == 0, watched.err
    lines = watched.out.splitlines()
    assert lines[0].startswith("NODE") and lines[1].startswith("alpha  ")
    assert lines[2] == f"-- watching cluster 'clitest' on {broker.kind} ({broker.server.url}); Ctrl-C to stop"
    assert any(" heartbeat  alpha  +" in line for line in lines[3:]), lines


async def test_watch_sees_a_join_and_a_leave_as_json_lines(broker: Broker, nodes: Nodes) -> None:
    await nodes.start("alpha")
    process = await spawn("watch", "--json", "--for", "60", env=broker.env)
    lines = Lines(process)
    try:
        present = json.loads(await lines.until(lambda line: '"present"' in line))
        assert present["node_id"] == "alpha" and present["node"]["handles"][0] == "Charge"
        await nodes.start("beta")
        joined = json.loads(await lines.until(lambda line: '"join"' in line))
        assert joined["node_id"] == "beta" and joined["node"]["endpoint"] == "http://beta.test:8000"
        await lines.until(lambda line: '"heartbeat"' in line and '"beta"' in line)
        await nodes.stop("beta")
        left = json.loads(await lines.until(lambda line: '"leave"' in line))
        assert left["node_id"] == "beta" and left["reason"] == "record removed"
        assert all(json.loads(line)["event"] != "leave" for line in lines.seen[:-1])
    finally:
        code = await lines.interrupt()  # Ctrl-C: the normal end of a watch
    assert code == 0


async def test_watch_ends_with_3_when_the_broker_goes_away(broker: Broker, nodes: Nodes) -> None:
    await nodes.start("alpha")
    process = await spawn("watch", "--json", env=broker.env)
    lines = Lines(process)
    await lines.until(lambda line: '"present"' in line)
    await nodes.stop("alpha")
    broker.server.stop()
    assert process.stderr is not None
    _, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 3
    assert "the broker" in err.decode()


async def test_a_watch_whose_reader_goes_away_ends_quietly(broker: Broker, nodes: Nodes) -> None:
    await nodes.start("alpha")
    process = subprocess.Popen(
        [sys.executable, "-m", "fastapi_catga", "watch", "--json"],
        env=cli_env(broker.env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    assert '"present"' in (await asyncio.to_thread(process.stdout.readline)).decode()
    process.stdout.close()  # `catga watch | grep -m1 ...`: the next heartbeat's line finds no reader
    assert await asyncio.to_thread(process.wait, 30) == 0
    assert process.stderr.read() == b""


async def test_send_prints_the_result_of_a_query(broker: Broker, nodes: Nodes) -> None:
    await nodes.start("alpha")
    await nodes.start("beta")

    sent = await catga("send", "Greet", '{"name": "ann"}', env=broker.env)
    assert sent.code == 0, sent.err
    assert sent.json() in ("hello ann from alpha", "hello ann from beta")

    on_beta = await catga(
        "send", "Greet", '{"name": "bob", "message_id": "m-1"}', "--node", "beta", "--json", env=broker.env
    )
    assert on_beta.code == 0, on_beta.err
    assert on_beta.json() == {
        "ok": True,
        "node": "beta",
        "message_id": "m-1",
        "result": "hello bob from beta",
    }


async def test_an_error_reply_is_printed_and_exits_1(broker: Broker, nodes: Nodes) -> None:
    await nodes.start("alpha")

    exploded = await catga("send", "Explode", "{}", env=broker.env)
    assert exploded.code == 1 and exploded.out == ""
    assert exploded.err.startswith("catga: error reply from node alpha: Explode handler raised ValueError")
    assert "  code: handler_error\n  type: ValueError\n" in exploded.err
    assert "the handler's own text" not in exploded.err

    refused = await catga("send", "Reserve", '{"sku": "apple"}', "--json", env=broker.env)
    assert refused.code == 1, refused.err
    error = refused.json()["error"]
    assert error == {
        "code": "out_of_stock",
        "message": "no apple left",
        "node": "alpha",
        "error_type": "OutOfStock",
        "details": {"sku": "apple", "left": 0},
    }

    invalid = await catga("send", "Greet", '{"name": 5}', env=broker.env)
    assert invalid.code == 1 and "from node alpha: invalid Greet" in invalid.err


async def test_send_says_when_no_node_takes_the_type_or_the_node_is_unknown(
    broker: Broker, nodes: Nodes
) -> None:
    await nodes.start("alpha")

    unknown = await catga("send", "Nope", "{}", env=broker.env)
    assert unknown.code == 1 and "'Nope'" in unknown.err and "unknown type?" in unknown.err

    ghost = await catga("send", "Greet", '{"name": "x"}', "--node", "ghost", env=broker.env)
    assert ghost.code == 1 and "no live node 'ghost' in cluster 'clitest'" in ghost.err

    event = await catga("send", "Noted", "{}", env=broker.env)
    assert event.code == 1 and "'Noted' is an event type" in event.err


async def test_health(broker: Broker, nodes: Nodes) -> None:
    await nodes.start("alpha")

    healthy = await catga("health", env=broker.env)
    assert healthy.code == 0, healthy.err
    assert healthy.out.split() == ["healthy", "True", "transport", broker.kind, "broker", broker.server.url,
                                   "cluster", "clitest", "members", "1"]  # fmt: skip
    report = (await catga("health", "--json", env=broker.env)).json()
    assert report == {
        "healthy": True,
        "transport": broker.kind,
        "broker": broker.server.url,
        "cluster": "clitest",
        "members": 1,
        "error": None,
    }

    await nodes.stop("alpha")
    broker.server.stop()
    down = await catga("health", "--broker-timeout", "1", env=broker.env)
    assert down.code == 3 and down.out == "" and down.err.startswith("catga: ")
    down_json = await catga("health", "--json", "--broker-timeout", "1", env=broker.env)
    assert down_json.code == 3
    assert down_json.json()["healthy"] is False and down_json.json()["error"]
    assert down_json.json()["members"] is None  # the same keys as a healthy report's
    assert (await catga("nodes", "--broker-timeout", "1", env=broker.env)).code == 3
    unreachable = await catga("nodes", "--json", "--broker-timeout", "1", env=broker.env)
    assert unreachable.code == 3 and unreachable.json()["ok"] is False  # on stdout, as JSON
    assert unreachable.json()["exit"] == 3 and unreachable.err.startswith("catga: ")


async def test_dead_letters_list_get_replay_and_discard(broker: Broker, nodes: Nodes) -> None:
    alpha = await nodes.start("alpha")
    first, second = Charge(amount=1), Charge(amount=2)
    rejecting.update({first.message_id, second.message_id})
    for command in (first, second):
        await alpha.mediator.enqueue(command)
    await eventually(lambda: _count(alpha), within=20, message="both dead-lettered")

    listed = await catga("dead-letters", "list", "--json", env=broker.env)
    assert listed.code == 0, listed.err
    letters = {letter["message_id"]: letter for letter in listed.json()}
    assert set(letters) == {first.message_id, second.message_id}
    assert letters[first.message_id]["reason"] == "rejected"
    first_id, second_id = letters[first.message_id]["id"], letters[second.message_id]["id"]

    table = await catga("dead-letters", "list", env=broker.env)
    assert table.out.split()[:9] == [
        "ID",
        "TYPE",
        "KIND",
        "REASON",
        "ATTEMPTS",
        "REPLAYS",
        "NODE",
        "AT",
        "ERROR",
    ]
    assert f"{first_id}  Charge" in table.out and "Reject: the card was declined" in table.out

    got = await catga("dead-letters", "get", first_id, "--json", env=broker.env)
    assert got.code == 0, got.err
    assert got.json()["body"] == {"message_id": first.message_id, "amount": 1}
    shown = await catga("dead-letters", "get", first_id, env=broker.env)
    assert f"id            {first_id}" in shown.out and '"amount": 1}' in shown.out

    rejecting.discard(first.message_id)
    replayed = await catga("dead-letters", "replay", first_id, env=broker.env)
    assert replayed.code == 0 and replayed.out == f"replayed {first_id}\n"
    await eventually(lambda: first.message_id in charged, within=20, message="the replay ran")

    discarded = await catga("dead-letters", "discard", second_id, "--json", env=broker.env)
    assert discarded.code == 0 and discarded.json() == {"discarded": second_id}
    assert (await catga("dead-letters", "list", "--json", env=broker.env)).json() == []
    for action in ("get", "replay", "discard"):
        missing = await catga("dead-letters", action, second_id, env=broker.env)
        assert missing.code == 1 and f"no dead letter {second_id!r}" in missing.err


async def _count(node: object) -> bool:
    from fastapi_catga import Catga

    assert isinstance(node, Catga)
    return len(await node.mediator.dead_letters.list()) == 2


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["nodes", "--for", "3"],
        ["watch", "--for", "-1"],
        ["send", "Greet"],
        ["send", "Greet", "not json"],
        ["send", "Greet", "[1]"],
        ["send", "Greet", '{"message_id": 5}'],  # not replaced unsaid: the README says it is kept
        ["send", "Greet", '{"name": NaN}'],  # Python's JSON reads it, no other does
        ["send", "Greet", '{"name": 1e999}'],  # a float of it is Infinity
        ["send", "no spaces", "{}"],
        ["send", "Greet", "{}", "--node", "a.b"],
        ["dead-letters"],
        ["dead-letters", "get"],
        ["dead-letters", "list", "--limit", "0"],
        ["send", "Greet", "{}", "--timeout", "inf"],  # no deadline a header can carry
        ["send", "Greet", "{}", "--timeout", "1e20"],
        ["nodes", "--broker-timeout", "nan"],
    ],
)
async def test_usage_errors_exit_2(args: list[str]) -> None:
    result = await catga(*args, env={})
    assert result.code == 2, (result.out, result.err)
    assert result.err and "Traceback" not in result.err
    result = await catga(*args, "--json", env={})  # and on stdout, for a script that reads one stream
    assert result.code == 2 and result.json() == {"ok": False, "exit": 2, "error": ANY}, result.out


async def test_help_documents_the_exit_codes() -> None:
    result = await catga("--help", env={})
    assert result.code == 0
    assert "exit codes:" in result.out and "3  the broker is unreachable or misconfigured" in result.out


@pytest.mark.parametrize(
    "args", [["nodes"], ["watch"], ["send", "Greet", "{}"], ["health"], ["dead-letters", "list", "--json"]]
)
async def test_the_memory_transport_exits_3(args: list[str]) -> None:
    result = await catga(*args, env={})
    assert result.code == 3 and MEMORY_SAYS in result.err
    if "--json" in args:  # why, on stdout too, for a script that reads one stream
        assert result.json() == {"ok": False, "exit": 3, "error": result.err.removeprefix("catga: ").strip()}
    else:
        assert result.out == ""


async def test_health_json_on_the_memory_transport() -> None:
    result = await catga("health", "--json", env={"CATGA_TRANSPORT": "memory"})
    assert result.code == 3
    assert result.json()["healthy"] is False and MEMORY_SAYS in result.json()["error"]


async def test_bad_settings_exit_3() -> None:
    result = await catga("nodes", env={"CATGA_CLUSTER": "no spaces allowed", "CATGA_TRANSPORT": "nats"})
    assert result.code == 3 and "CATGA_CLUSTER" in result.err


@pytest.mark.parametrize(
    ("transport", "url"),
    [("nats", "nats://catga:S3cret-pw@127.0.0.1:{port}"), ("redis", "redis://:S3cret-pw@127.0.0.1:{port}/0")],
)
async def test_a_broker_password_never_shows(transport: str, url: str) -> None:
    from tests.servers import free_port

    option = f"--{transport}-url"
    for args in (["health"], ["health", "--json"], ["nodes"], ["watch", "--json"]):
        result = await catga(*args, "--transport", transport, option, url.format(port=free_port()),
                             "--broker-timeout", "1", env={})  # fmt: skip
        assert result.code == 3, result.err
        assert "S3cret-pw" not in result.out + result.err and "***" in result.out + result.err


@pytest.mark.parametrize("transport", ["nats", "redis"])
async def test_a_refused_connection_says_so(transport: str) -> None:
    """The transport's own error, which says why, and not the CLI's "did not answer in time"."""
    from tests.servers import free_port

    url = f"{transport}://127.0.0.1:{free_port()}"
    result = await catga("nodes", "--transport", transport, f"--{transport}-url", url, env={})
    assert result.code == 3 and ("refused" in result.err or "111" in result.err), result.err
