"""The CLI's pure parts, in process: what a watch reports for each change, and how tables read."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from fastapi_catga.cli.render import age, fields, table
from fastapi_catga.cli.watch import Watcher
from fastapi_catga.core.nodes import NodeInfo

T0 = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)


def record(node_id: str, seconds: float = 0, **fields: object) -> NodeInfo:
    base = {
        "node_id": node_id,
        "last_seen": T0 + timedelta(seconds=seconds),
        "started_at": T0,
        "incarnation": "one",
    }
    return NodeInfo.model_validate({**base, **fields})


def test_a_watch_reports_each_change_once() -> None:
    lines: list[str] = []
    watcher = Watcher(as_json=True, emit=lines.append)
    watcher.present([record("a")], now=0.0)
    watcher.put(record("a"), now=1.0)  # the watch repeating the current record: nothing new
    watcher.put(record("a", 1), now=2.0)
    watcher.put(record("a", 0.5), now=2.5)  # older than what was shown: ignored
    watcher.put(record("a", 2, handles=["Greet"]), now=3.0)
    watcher.put(record("a", 3, incarnation="two"), now=4.0)
    watcher.put(record("b", 3), now=4.0)
    watcher.delete("b")
    watcher.delete("b")  # deleted twice (a watch may repeat deletes): one leave
    events = [(line["event"], line["node_id"], line.get("reason")) for line in map(json.loads, lines)]
    assert events == [
        ("present", "a", None),
        ("heartbeat", "a", None),
        ("update", "a", None),
        ("restart", "a", None),
        ("join", "b", None),
        ("leave", "b", "record removed"),
    ]


def test_a_full_read_finds_who_left_without_a_word() -> None:
    lines: list[str] = []
    watcher = Watcher(as_json=False, emit=lines.append)
    watcher.present([record("a"), record("b")], now=0.0)
    watcher.put(record("c"), now=5.0)  # joined after the read below began: not gone
    del lines[:]
    watcher.resync([record("a", 1)], read_at=4.0)
    assert [line.split()[1:] for line in lines] == [
        ["heartbeat", "a", "+1.0s"],
        ["leave", "b", "record", "expired"],
    ]
    assert set(watcher.known) == {"a", "c"}


def test_ages_and_tables() -> None:
    assert [age(T0 - timedelta(seconds=s), T0) for s in (0.42, 185, 7380, 352800, -3)] == [
        "0.4s",
        "3m05s",
        "2h03m",
        "4d02h",
        "0.0s",
    ]
    assert table(("A", "LONGER"), [["x", ""], ["wide cell", "y"]]).splitlines() == [
        "A          LONGER",
        "x",
        "wide cell  y",
    ]
    assert fields([("id", "1"), ("message", "hi")]) == "id       1\nmessage  hi"
