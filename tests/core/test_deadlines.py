"""`Deadlines`: one timer for the deadlines of runs awaited in their callers' tasks, on a virtual
clock (each test runs in milliseconds); and the in-process ``send`` that writes its steps inline."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from fastapi_catga import Command, RequestTimeoutError, handler
from fastapi_catga.core.deadlines import DeadlinePassed, Deadlines
from fastapi_catga.testing import InMemoryBroker
from tests.virtual_time import run_virtual, virtual_node

Scenario = Callable[[Deadlines, asyncio.AbstractEventLoop], Awaitable[Any]]


def on_virtual_clock(scenario: Scenario) -> Any:
    async def main() -> Any:
        loop = asyncio.get_running_loop()
        return await scenario(Deadlines(loop.time), loop)

    return run_virtual(main())


async def sleeper(seconds: float, log: list[str] | None = None, name: str = "") -> str:
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        if log is not None:
            log.append(f"{name} cancelled")
        raise
    return f"slept {seconds:g}"


def test_a_run_that_ends_in_time_is_never_looked_at_and_arms_one_timer_in_all() -> None:
    async def scenario(deadlines: Deadlines, loop: asyncio.AbstractEventLoop) -> None:
        armed: list[float] = []
        arm = deadlines.arm

        def counted(deadline: float) -> None:
            armed.append(deadline)
            arm(deadline)

        deadlines.arm = counted  # type: ignore[method-assign]
        for _ in range(1000):
            assert await deadlines.run(sleeper(0), 5.0) == "slept 0"
        assert len(armed) == 1  # later runs' deadlines are all after the armed one
        assert deadlines.current is None and not deadlines.expired

    on_virtual_clock(scenario)


def test_a_run_past_its_deadline_is_cancelled_then_and_not_before() -> None:
    async def scenario(deadlines: Deadlines, loop: asyncio.AbstractEventLoop) -> float:
        log: list[str] = []
        started = loop.time()
        with pytest.raises(DeadlinePassed):
            await deadlines.run(sleeper(10, log, "slow"), 2.0)
        assert log == ["slow cancelled"]
        assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
        return loop.time() - started

    assert on_virtual_clock(scenario) == pytest.approx(2.0, abs=0.002)


def test_runs_in_many_tasks_each_end_at_their_own_deadline_whatever_the_order() -> None:
    async def scenario(deadlines: Deadlines, loop: asyncio.AbstractEventLoop) -> dict[str, float]:
        ended: dict[str, float] = {}
        started = loop.time()

        async def one(name: str, budget: float, runs_for: float) -> None:
            try:
                await deadlines.run(sleeper(runs_for), budget)
                ended[name] = loop.time() - started
            except DeadlinePassed:
                ended[name] = -(loop.time() - started)  # negative: cut at its deadline

        # Started latest deadline first: each new run arms the timer earlier.
        await asyncio.gather(
            one("c", 3.0, 10),
            one("b", 2.0, 10),
            one("a", 1.0, 10),
            one("quick", 5.0, 0.5),
            one("d", 4.0, 3.5),
        )
        return ended

    ended = on_virtual_clock(scenario)
    assert ended == {
        "quick": pytest.approx(0.5, abs=0.002),
        "a": pytest.approx(-1.0, abs=0.002),
        "b": pytest.approx(-2.0, abs=0.002),
        "c": pytest.approx(-3.0, abs=0.002),
        "d": pytest.approx(3.5, abs=0.002),
    }


def test_nested_runs_in_one_task_the_outer_deadline_cancels_both_and_only_the_outer_times_out() -> None:
    async def scenario(deadlines: Deadlines, loop: asyncio.AbstractEventLoop) -> list[str]:
        log: list[str] = []

        async def outer() -> str:
            try:
                return str(await deadlines.run(sleeper(10, log, "inner"), 5.0))
            except DeadlinePassed:
                log.append("inner timed out")  # wrong: it was the outer deadline
                raise
            except asyncio.CancelledError:
                log.append("inner saw the outer's cancellation")
                raise

        with pytest.raises(DeadlinePassed):
            await deadlines.run(outer(), 1.0)
        return log

    assert on_virtual_clock(scenario) == ["inner cancelled", "inner saw the outer's cancellation"]


def test_someone_elses_cancellation_passes_through_as_it_is() -> None:
    async def scenario(deadlines: Deadlines, loop: asyncio.AbstractEventLoop) -> None:
        task = asyncio.ensure_future(deadlines.run(sleeper(10), 5.0))
        await asyncio.sleep(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not deadlines.expired and deadlines.current is None

    on_virtual_clock(scenario)


@pytest.mark.parametrize("keep_late", [False, True])
def test_a_run_that_swallows_its_cancellation_goes_on_and_the_request_is_withdrawn(keep_late: bool) -> None:
    """It ends late: what it returned is dropped for `DeadlinePassed` (a remote caller would have moved
    on), unless kept (a publish the broker took late was taken)."""

    async def scenario(deadlines: Deadlines, loop: asyncio.AbstractEventLoop) -> tuple[str, float, int]:
        async def stubborn() -> str:
            with contextlib.suppress(asyncio.CancelledError):  # swallowed: the run goes on
                await asyncio.sleep(10)
            await asyncio.sleep(1)
            return "finished anyway"

        try:
            result = await deadlines.run(stubborn(), 2.0, keep_late=keep_late)
        except DeadlinePassed:
            result = "deadline passed"
        return result, loop.time(), asyncio.current_task().cancelling()  # type: ignore[union-attr]

    result, ended, cancelling = on_virtual_clock(scenario)
    assert result == ("finished anyway" if keep_late else "deadline passed")
    assert ended == pytest.approx(3.0, abs=0.01) and cancelling == 0


def test_many_runs_passing_their_deadlines_together_are_cancelled_in_batches_never_early() -> None:
    async def scenario(deadlines: Deadlines, loop: asyncio.AbstractEventLoop) -> list[float]:
        lateness: list[float] = []

        async def one(budget: float) -> None:
            started = loop.time()
            with pytest.raises(DeadlinePassed):
                await deadlines.run(sleeper(10), budget)
            lateness.append(loop.time() - started - budget)

        await asyncio.gather(*(one(1.0 + i * 0.0001) for i in range(200)))  # 0.1 ms apart
        return lateness

    lateness = on_virtual_clock(scenario)
    assert len(lateness) == 200
    assert min(lateness) >= 0  # never early
    assert max(lateness) < 0.01  # batched: a few ms late at most on this clock


class Stuck(Command[str]):
    type_name = "deadlines.Stuck"

    seconds: float


class Quick(Command[str]):
    type_name = "deadlines.Quick"


@handler
async def stuck(message: Stuck) -> str:
    await asyncio.sleep(message.seconds)
    return "done"


@handler
async def quick(message: Quick) -> str:
    return "quick"


def test_in_process_sends_time_out_at_their_deadline_and_give_their_slot_back() -> None:
    async def scenario() -> list[float]:
        loop = asyncio.get_running_loop()
        node = virtual_node(
            InMemoryBroker(clock=loop.time), "solo", handlers=[stuck, quick], request_timeout=3.0
        )
        await node.start()
        try:
            took: list[float] = []

            async def one(timeout: float | None, seconds: float) -> str:
                started = loop.time()
                try:
                    return await node.mediator.send(Stuck(seconds=seconds), timeout=timeout)
                except RequestTimeoutError:
                    took.append(round(loop.time() - started, 3))
                    return "timed out"

            results = await asyncio.gather(
                one(None, 10),
                one(1.0, 10),
                one(2.0, 1.5),
                one(0.5, 10),
                *(node.mediator.send(Quick()) for _ in range(3)),
            )
            assert results == ["timed out", "timed out", "done", "timed out", "quick", "quick", "quick"]
            assert node.node.limits.in_flight == 0
            return sorted(took)
        finally:
            await node.stop()

    took = run_virtual(scenario())
    assert took == pytest.approx([0.5, 1.0, 3.0], abs=0.002)


cancelled_on: list[str] = []


class FarStuck(Command[str]):
    type_name = "deadlines.FarStuck"


@handler
async def far_stuck(message: FarStuck) -> str:
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        cancelled_on.append(message.message_id)
        raise
    return "done"


def test_a_remote_run_past_its_callers_deadline_is_cancelled_on_the_node_that_runs_it() -> None:
    """The responder's run (an eager task on 3.12+, the intake's task on 3.11) is found and
    cancelled when the deadline its caller sent passes, never before."""

    async def scenario() -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        caller = virtual_node(broker, "caller", handlers=[])
        runner = virtual_node(broker, "runner", handlers=[far_stuck])
        await runner.start()
        await caller.start()
        try:
            sent = FarStuck()
            started = loop.time()
            with pytest.raises(RequestTimeoutError):
                await caller.mediator.send(sent, timeout=2.0)
            timed_out = loop.time() - started
            while sent.message_id not in cancelled_on and loop.time() - started < 30:
                await asyncio.sleep(0.01)
            assert sent.message_id in cancelled_on, "the remote run was not cancelled"
            cancelled = loop.time() - started
            while runner.node.limits.in_flight and loop.time() - started < 30:
                await asyncio.sleep(0.01)  # the run's task ends, and gives its slot back, after
            assert runner.node.limits.in_flight == 0
            return timed_out, cancelled
        finally:
            await caller.stop()
            await runner.stop()

    timed_out, cancelled = run_virtual(scenario())
    assert timed_out == pytest.approx(2.0, abs=0.05)
    assert 1.9 <= cancelled <= 2.1


def test_a_run_awaited_inside_an_async_generator_or_context_manager_is_cancelled_at_its_deadline() -> None:
    """``async for`` and ``@asynccontextmanager`` step a generator through an awaitable that shows
    no link to it; the run inside must still be found (a FastAPI ``yield`` dependency, an SSE body)."""

    async def scenario(deadlines: Deadlines, loop: asyncio.AbstractEventLoop) -> list[str]:
        outcomes: list[str] = []

        async def generator() -> AsyncIterator[str]:
            try:
                yield str(await deadlines.run(sleeper(10), 1.0))
            except DeadlinePassed:
                yield "deadline"

        async for outcome in generator():
            outcomes.append(outcome)

        @contextlib.asynccontextmanager
        async def managed() -> AsyncIterator[str]:
            try:
                yield str(await deadlines.run(sleeper(10), 1.0))
            except DeadlinePassed:
                yield "deadline"

        async with managed() as outcome:
            outcomes.append(outcome)
        assert loop.time() < 2.1
        return outcomes

    assert on_virtual_clock(scenario) == ["deadline", "deadline"]


def test_nested_runs_due_together_time_out_once_and_log_nothing(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(deadlines: Deadlines, loop: asyncio.AbstractEventLoop) -> None:
        async def outer() -> Any:
            return await deadlines.run(sleeper(10), 1.0)

        with pytest.raises(DeadlinePassed):
            await deadlines.run(outer(), 1.0)

    on_virtual_clock(scenario)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_the_in_process_send_keeps_deadlines_as_deadlines_run_does() -> None:
    """`Mediator.send` writes `Deadlines.run`'s steps inline: someone else's cancellation passes as
    it is, and a handler that swallows the deadline's cancellation ends in `RequestTimeoutError`
    when it ends, its result dropped, as its caller would have got had it run on another node."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        node = virtual_node(InMemoryBroker(clock=loop.time), "solo", handlers=[stuck, stubborn_handler])
        await node.start()
        try:
            task = asyncio.ensure_future(node.mediator.send(Stuck(seconds=10), timeout=5.0))
            await asyncio.sleep(1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            started = loop.time()
            with pytest.raises(RequestTimeoutError, match="no answer within 1 s"):
                await node.mediator.send(Stubborn(), timeout=1.0)
            assert loop.time() - started == pytest.approx(1.0, abs=0.01)
            assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
            assert node.node.limits.in_flight == 0
        finally:
            await node.stop()

    run_virtual(scenario())


class Stubborn(Command[str]):
    type_name = "deadlines.Stubborn"


@handler
async def stubborn_handler(message: Stubborn) -> str:
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(10)
    return "finished anyway"


@pytest.mark.parametrize("keep_late", [False, True])
async def test_a_run_that_holds_the_loop_past_its_deadline_ends_late(keep_late: bool) -> None:
    """It never suspends, so no timer fires: what it returns after its deadline is dropped (a caller
    elsewhere has moved on), unless kept."""
    now = [0.0]
    deadlines = Deadlines(lambda: now[0])

    async def blocking() -> str:
        now[0] += 3.0  # as long as a blocking call held the loop
        return "done late"

    async def quick() -> str:
        now[0] += 1.0
        return "done in time"

    assert await deadlines.run(quick(), 2.0, keep_late=keep_late) == "done in time"
    if keep_late:
        assert await deadlines.run(blocking(), 2.0, keep_late=True) == "done late"
    else:
        with pytest.raises(DeadlinePassed):
            await deadlines.run(blocking(), 2.0)
