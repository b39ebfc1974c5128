"""`HandlerLimits` on its own: slots per node and per type, and the queue where received events
wait for one (first in first out within a type, types taking turns, bounded in all)."""

from __future__ import annotations

import functools
import logging
import random
from collections import Counter, deque
from typing import Any, ClassVar

import pytest

from fastapi_catga import Command, ConfigurationError
from fastapi_catga.cluster.limits import HandlerLimits
from fastapi_catga.core.logs import LogLimiter
from fastapi_catga.core.observe import Observer


class Slow(Command[str]):
    pass


class Heavy(Command[str]):
    max_in_flight: ClassVar[int | None] = 1


class Seen(Observer):
    def __init__(self) -> None:
        self.overloads: list[tuple[str, str]] = []

    def overloaded(self, type_name: str, outcome: str) -> None:
        self.overloads.append((type_name, outcome))


def queue_events(limits: HandlerLimits, names: str, started: list[str]) -> None:
    for name in names:
        limits.run_event(name, functools.partial(started.append, name))


def test_limits_count_per_node_and_per_type_and_a_class_sets_its_own() -> None:
    limits = HandlerLimits(3, 2, 10, [Slow, Heavy], node_id="n")
    assert limits.cap("Slow") == 2 and limits.cap("Heavy") == 1 and limits.cap("Other") == 2
    assert limits.enter("Heavy") and not limits.enter("Heavy")  # its own cap: 1
    assert limits.enter("Slow") and limits.enter("Slow") and not limits.enter("Slow")  # per type: 2
    assert not limits.enter("Other")  # the node's 3 are taken
    assert limits.in_flight == 3
    limits.leave("Slow")
    assert limits.enter("Other") and limits.in_flight == 3
    for name in ("Heavy", "Slow", "Other"):
        limits.leave(name)
    assert limits.in_flight == 0 and limits._running == {}
    unlimited = HandlerLimits(0, 0, 10, [], node_id="n")
    assert all(unlimited.enter("Slow") for _ in range(10_000))


def test_a_bad_max_in_flight_on_a_class_is_refused_at_start() -> None:
    class Zero(Command[None]):
        max_in_flight: ClassVar[int | None] = 0

    with pytest.raises(ConfigurationError, match=r"Zero.max_in_flight must be a positive int"):
        HandlerLimits(10, 0, 10, [Zero], node_id="n")


def test_events_wait_first_in_first_out_and_overflow_is_counted_and_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    seen = Seen()
    limits = HandlerLimits(1, 0, 2, [], node_id="n", observer=seen, log_limit=LogLimiter(5.0, lambda: now[0]))
    started: list[int] = []
    for number in range(5):
        limits.run_event("Tick", functools.partial(started.append, number))
    assert started == [0] and limits.events_waiting == 2
    assert limits.stats["events_dropped"] == 2 and seen.overloads == [("Tick", "dropped")] * 2
    assert len([r for r in caplog.records if "dropped a Tick event" in r.getMessage()]) == 1
    limits.leave("Tick")  # the first one ends: the next starts with its slot
    assert started == [0, 1] and limits.in_flight == 1
    now[0] = 5.0
    limits.run_event("Tick", lambda: None)  # waits (the queue holds 2 again)
    limits.run_event("Tick", lambda: None)  # dropped, and logged again: the interval passed
    lines = [r.getMessage() for r in caplog.records if "dropped a Tick event" in r.getMessage()]
    assert len(lines) == 2 and "1 more since the last report" in lines[1]


def test_an_event_whose_type_is_at_its_cap_holds_back_no_other_type() -> None:
    limits = HandlerLimits(100, 1, 3, [], node_id="n")
    started: list[str] = []
    queue_events(limits, "AABCDE", started)
    assert started == ["A", "B", "C", "D", "E"]  # the second A waits for the first; no one else does
    assert limits.events_waiting == 1 and limits.stats["events_dropped"] == 0
    queue_events(limits, "AB", started)  # A's queue grows behind its cap; B is at its cap too now
    assert limits.events_waiting == 3 and limits.stats["events_dropped"] == 0
    limits.leave("C")  # a slot of another type frees nothing for A or B
    assert started == ["A", "B", "C", "D", "E"]
    limits.leave("A")
    assert started[5:] == ["A"] and limits.events_waiting == 2
    limits.leave("B")
    assert started[6:] == ["B"]
    limits.leave("A")
    assert started[7:] == ["A"] and limits.events_waiting == 0


def test_types_waiting_for_the_nodes_limit_take_turns_first_in_first_out_within_each() -> None:
    limits = HandlerLimits(3, 0, 10, [], node_id="n")
    started: list[str] = []
    queue_events(limits, "XYA", started)  # the node is full
    for number in range(1, 4):
        limits.run_event("A", functools.partial(started.append, f"A{number}"))
    queue_events(limits, "BC", started)
    for name in ("X", "Y", "B", "C", "A"):  # each run that ends lets the next in turn start
        limits.leave(name)
    assert started[3:] == ["A1", "B", "C", "A2", "A3"]  # B and C did not wait behind A's backlog
    for name in ("A", "A", "A"):
        limits.leave(name)
    assert limits.in_flight == 0 and limits.events_waiting == 0 and limits.ready == deque()


def test_a_start_that_raises_gives_its_slot_back(caplog: pytest.LogCaptureFixture) -> None:
    limits = HandlerLimits(1, 0, 10, [], node_id="n")

    def broken() -> None:
        raise RuntimeError("no task")

    with pytest.raises(RuntimeError):
        limits.run_event("A", broken)  # at once: the caller hears it
    assert limits.in_flight == 0
    started: list[str] = []
    queue_events(limits, "A", started)
    limits.run_event("B", broken)
    queue_events(limits, "C", started)
    limits.leave("A")  # B fails to start: logged, its slot back, and C starts all the same
    assert started == ["A", "C"] and limits.in_flight == 1 and limits.events_waiting == 0
    assert any("could not start a waiting B event" in r.getMessage() for r in caplog.records)


def test_drop_waiting_forgets_every_queue() -> None:
    limits = HandlerLimits(1, 1, 10, [], node_id="n")
    started: list[str] = []
    queue_events(limits, "AABBC", started)
    assert limits.drop_waiting() == 4 and limits.events_waiting == 0
    assert limits.stats["events_dropped"] == 4
    limits.leave("A")
    assert started == ["A"] and limits.in_flight == 0
    queue_events(limits, "B", started)
    assert started == ["A", "B"]


@pytest.mark.parametrize("seed", range(20))
def test_random_traffic_keeps_every_bound_and_leaves_no_event_waiting_that_could_run(seed: int) -> None:
    rng = random.Random(seed)
    types = "ABCDE"
    caps = {name: rng.randint(1, 4) for name in types}

    class A(Command[None]):  # its own cap; the others have the per-type one
        max_in_flight: ClassVar[int | None] = caps["A"]

    limits = HandlerLimits(rng.randint(1, 8), caps["B"], rng.randint(0, 12), [A], node_id="n")
    cap = {name: limits.cap(name) for name in types}
    running: Counter[str] = Counter()
    sent: dict[str, list[int]] = {name: [] for name in types}
    began: dict[str, list[int]] = {name: [] for name in types}

    def start(name: str, number: int) -> None:
        running[name] += 1
        began[name].append(number)

    for step in range(400):
        if running and rng.random() < 0.45:
            name = rng.choice(sorted(running.elements()))
            running[name] -= 1
            running += Counter()  # forget the zeros
            limits.leave(name)
        else:
            name = rng.choice(types)
            sent[name].append(step)
            limits.run_event(name, functools.partial(start, name, step))
        assert limits.in_flight == running.total() <= limits.limit
        assert all(running[name] <= cap[name] for name in types)
        waiting: dict[str, Any] = limits._waiting
        assert limits.events_waiting == sum(map(len, waiting.values())) <= limits.max_queued_events
        for name in waiting:  # what waits could not run now
            assert limits.in_flight == limits.limit or running[name] == cap[name], (step, name)
    for name in types:  # within a type, first in first out; what was dropped was never started
        assert began[name] == sorted(began[name]) and set(began[name]) <= set(sent[name])
    accounted = sum(map(len, began.values())) + limits.events_waiting + limits.stats["events_dropped"]
    assert accounted == sum(map(len, sent.values()))


def test_the_queue_never_exceeds_its_bound_across_types(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)  # the drop lines are not the point here
    limits = HandlerLimits(2, 1, 5, [], node_id="n")
    started: list[str] = []
    queue_events(limits, "AB" + "AB" * 10, started)
    assert started == ["A", "B"] and limits.events_waiting == 5
    assert limits.stats["events_dropped"] == 15
