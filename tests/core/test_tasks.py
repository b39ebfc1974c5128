"""cancel_and_wait: a stop goes on without a task that will not stop, and says which one it was."""

from __future__ import annotations

import asyncio
import logging

import pytest

from fastapi_catga.core.tasks import cancel_and_wait
from tests.virtual_time import run_virtual

logger = logging.getLogger("tests.tasks")


async def _stubborn() -> None:
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            continue  # what a library that catches cancellation while it reconnects does


async def _failing() -> None:
    raise RuntimeError("a bug")


def test_a_task_that_swallows_its_cancellation_is_left_behind_after_the_grace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        stubborn = loop.create_task(_stubborn(), name="stubborn")
        polite = loop.create_task(asyncio.sleep(3600), name="polite")
        failing = loop.create_task(_failing(), name="failing")
        await asyncio.sleep(0)
        started = loop.time()
        await cancel_and_wait([stubborn, polite, failing], what="test", logger=logger, grace=2.0)
        took = loop.time() - started
        assert polite.cancelled() and not stubborn.done()
        stubborn.get_coro().close()
        return took

    took = run_virtual(scenario())
    assert took == pytest.approx(2.0)
    assert (
        "1 test task(s) did not end within 2.0 s of being cancelled; going on without: stubborn"
        in caplog.text
    )


def test_tasks_that_end_when_cancelled_are_not_waited_for() -> None:
    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        tasks = [loop.create_task(asyncio.sleep(3600)) for _ in range(3)]
        await asyncio.sleep(0)
        started = loop.time()
        await cancel_and_wait(tasks, what="test", logger=logger)
        return loop.time() - started

    assert run_virtual(scenario()) == 0.0
