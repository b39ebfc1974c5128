"""`Runs`, eager runs: each run's first step runs before anything else is scheduled, in its own
context; one that suspends goes on in the task that took its first step (3.12+: an eager task of
its own; 3.11: the intake's, which hands the rest of the queue to a new one). Slots come back
however a run ends, and a stop ends what has not started."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import inspect
import logging

import pytest

from fastapi_catga.cluster.limits import HandlerLimits
from fastapi_catga.cluster.runs import Runs
from fastapi_catga.core.logs import LogLimiter
from tests.polling import eventually
from tests.virtual_time import run_virtual

seen: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="")


def make_runs() -> tuple[HandlerLimits, Runs]:
    limits = HandlerLimits(0, 0, 10, [], node_id="n")
    return limits, Runs(limits, "n", LogLimiter())


def spawn(limits: HandlerLimits, runs: Runs, work: object, name: str = "Work") -> None:
    assert limits.enter(name)
    runs.spawn(work, name, name, eager=True)  # type: ignore[arg-type]


def test_a_run_that_suspends_keeps_its_timeout_and_the_others_run_meanwhile() -> None:
    async def scenario() -> None:  # on a virtual clock: a stalled box cannot fire the 50 ms early
        limits, runs = make_runs()
        done: list[str] = []

        async def slow() -> None:
            try:
                async with asyncio.timeout(0.05):  # entered in the first step: bound to the run's task
                    await asyncio.sleep(10)
            except TimeoutError:
                done.append("slow timed out")

        async def quick(name: str) -> None:
            done.append(name)

        spawn(limits, runs, slow())
        for name in ("a", "b"):
            spawn(limits, runs, quick(name))
        await asyncio.sleep(0.01)
        assert done == ["a", "b"] and limits.in_flight == 1
        await asyncio.sleep(0.2)
        assert done == ["a", "b", "slow timed out"] and limits.in_flight == 0

    run_virtual(scenario())


async def test_runs_queued_behind_one_that_suspends_all_start_in_the_next_loop_turn() -> None:
    # What they send then goes out together (a Redis reply waits for its PUBLISH: every run suspends).
    limits, runs = make_runs()
    started: list[int] = []
    release = asyncio.Event()

    async def waits(number: int) -> None:
        started.append(number)
        await release.wait()

    for number in range(4):
        spawn(limits, runs, waits(number))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert started == [0, 1, 2, 3]
    release.set()
    await asyncio.sleep(0.01)
    assert limits.in_flight == 0


async def test_runs_that_end_in_their_first_step_leave_nothing_scheduled() -> None:
    """A request at a time costs the responder no loop turn after its run: the intake (3.11) does
    its own bookkeeping when the queue is drained, and its end schedules no callback."""
    limits, runs = make_runs()
    loop = asyncio.get_running_loop()
    done: list[int] = []

    async def quick(number: int) -> None:
        done.append(number)

    for number in range(3):
        spawn(limits, runs, quick(number))
        while number not in done:
            await asyncio.sleep(0)
        assert not loop._ready, "nothing left for the next turn of the loop"  # type: ignore[attr-defined]
        assert limits.in_flight == 0 and not runs._tasks and runs._intake is None
    assert done == [0, 1, 2]


async def test_each_run_has_its_own_context_and_a_task_of_its_own_when_it_suspends() -> None:
    limits, runs = make_runs()
    found: list[str] = []
    tasks: set[asyncio.Task[object] | None] = set()

    async def work(name: str) -> None:
        found.append(seen.get())
        seen.set(name)
        tasks.add(asyncio.current_task())
        await asyncio.sleep(0.01)
        found.append(seen.get())
        tasks.add(asyncio.current_task())

    for name in ("a", "b", "c"):
        spawn(limits, runs, work(name))
    await asyncio.sleep(0.1)
    assert found == ["", "", "", "a", "b", "c"]
    assert None not in tasks and len(tasks) == 3
    assert limits.in_flight == 0 and seen.get() == ""


async def test_a_run_that_fails_in_its_first_step_is_logged_and_the_next_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limits, runs = make_runs()
    done: list[str] = []

    async def broken() -> None:
        raise ValueError("boom")

    async def fine() -> None:
        done.append("fine")

    with caplog.at_level(logging.ERROR):
        spawn(limits, runs, broken(), "Broken")
        spawn(limits, runs, fine())
        await asyncio.sleep(0.01)
    assert done == ["fine"] and limits.in_flight == 0
    assert "boom" in caplog.text


@pytest.mark.parametrize("eager", [True, False])
async def test_a_run_that_ends_with_what_is_no_answer_is_logged_as_it_ends(
    eager: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A run that raises after it suspended (a bug: a dispatcher answers what a handler raises,
    ``GeneratorExit`` too): the run's task ends with it. Said in the log at once, naming the run,
    and not as "Task exception was never retrieved" at some later garbage collection (on 3.11 the
    task is the intake's when the run started in it)."""
    limits, runs = make_runs()

    async def exits() -> None:
        await asyncio.sleep(0)
        raise GeneratorExit

    with caplog.at_level(logging.ERROR):
        assert limits.enter("Exits")
        runs.spawn(exits(), "Exits", "Exits", eager=eager)
        await eventually(lambda: limits.in_flight == 0, within=5)
        gc.collect()
        await asyncio.sleep(0)
    messages = [record.getMessage() for record in caplog.records]
    assert "a run of Exits failed" in messages
    assert not [message for message in messages if "never retrieved" in message]


@pytest.mark.parametrize("ends", ["returns", "raises", "uncancels"])
async def test_a_run_that_cancels_its_own_task_and_ends_cancels_no_other_run(
    ends: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A handler may cancel "its task" (``asyncio.current_task().cancel()``) and end without a
    suspension: the request is its own, and ends with it. On 3.11 that task is the intake's, which
    would then cancel the next run to suspend in it: another request."""
    limits, runs = make_runs()
    done: list[str] = []

    async def cancels_itself() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        if ends == "raises":
            raise ValueError("ended after cancelling its task")
        if ends == "uncancels":  # before 3.13 the cancellation stays pending all the same
            task.uncancel()

    async def waits(name: str) -> None:
        await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        done.append(name)

    with caplog.at_level(logging.ERROR):
        spawn(limits, runs, cancels_itself(), "Cancels")
        for name in ("a", "b"):
            spawn(limits, runs, waits(name))
        await eventually(lambda: limits.in_flight == 0, within=5, message="every run ended")
    assert done == ["a", "b"]
    spawn(limits, runs, waits("later"))  # the node takes more, as before
    await eventually(lambda: done == ["a", "b", "later"], within=5, message="a later run ended")
    assert limits.in_flight == 0 and not runs._tasks


async def test_a_stop_ends_runs_not_started_and_gives_their_slots_back() -> None:
    limits, runs = make_runs()

    async def stuck() -> None:
        await asyncio.Event().wait()

    started = stuck()
    spawn(limits, runs, started)
    await asyncio.sleep(0.01)  # its first step taken: it waits
    waiting = [stuck() for _ in range(3)]
    for work in waiting:
        spawn(limits, runs, work)
    await runs.stop(0)  # cancelled before anything else ran
    assert limits.in_flight == 0
    assert inspect.getcoroutinestate(started) == "CORO_CLOSED"
    assert all(inspect.getcoroutinestate(work) == "CORO_CLOSED" for work in waiting)


async def test_each_run_gets_the_context_it_was_spawned_in_on_every_python() -> None:
    """The 3.11 intake copies the spawner's context for each run, as an eager task does on 3.12+
    (the memory transport delivers in the sender's context: one caller's values never reach another's run)."""
    caller: contextvars.ContextVar[str] = contextvars.ContextVar("caller", default="-")
    limits = HandlerLimits(0, 0, 10, [], node_id="n")
    runs = Runs(limits, "n", LogLimiter())
    seen: list[tuple[str, str]] = []

    async def work(expected: str) -> None:
        await asyncio.sleep(0)  # suspends: the runs queued behind it get tasks of their own
        seen.append((expected, caller.get()))

    def deliver(name: str) -> None:
        caller.set(name)
        assert limits.enter("W")
        runs.spawn(work(name), name, "W", eager=True)

    for name in ("a", "b", "c"):
        contextvars.copy_context().run(deliver, name)
    await eventually(lambda: len(seen) == 3, within=5, message="every run ran")
    assert sorted(seen) == [("a", "a"), ("b", "b"), ("c", "c")]
