"""`is_handler_error`: what a handler's run raised that is answered, and what ends the run itself."""

from __future__ import annotations

import asyncio

import pytest

from fastapi_catga.core.raised import is_handler_error, owned_run


@pytest.mark.parametrize("error", [SystemExit(3), KeyboardInterrupt(), ValueError()])
async def test_in_a_task_whatever_the_handler_raised_is_its_error(error: BaseException) -> None:
    assert is_handler_error(error)


async def test_generator_exit_is_an_answer_only_in_a_run_catga_owns() -> None:
    """Elsewhere it may be a caller's coroutine closed by code in some task: a close stays one."""
    assert not is_handler_error(GeneratorExit())

    async def run() -> bool:
        owned_run()
        return is_handler_error(GeneratorExit())

    assert await asyncio.create_task(run())
    assert not is_handler_error(GeneratorExit()), "the mark stays in that run's own context"


async def test_the_cancellation_of_the_running_task_is_no_answer() -> None:
    async def cancelled() -> bool:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError as exc:
            return is_handler_error(exc)
        raise AssertionError("not cancelled")

    assert not await asyncio.create_task(cancelled())
    assert is_handler_error(asyncio.CancelledError()), "the handler's own: its task is not cancelled"


def test_a_coroutine_closed_outside_any_task_is_no_answer() -> None:
    """A leaked coroutine collected: its close is not turned into an error reply."""
    assert not is_handler_error(GeneratorExit())
    assert is_handler_error(SystemExit(3))
