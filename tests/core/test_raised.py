"""`is_handler_error`: what a handler's run raised that is answered, and what ends the run itself."""

from __future__ import annotations

import asyncio

import pytest

from fastapi_catga.core.raised import is_handler_error


@pytest.mark.parametrize("error", [SystemExit(3), KeyboardInterrupt(), GeneratorExit(), ValueError()])
async def test_in_a_task_whatever_the_handler_raised_is_its_error(error: BaseException) -> None:
    assert is_handler_error(error)


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
    """A leaked run collected: its close is not turned into an error reply (nothing could send it)."""
    assert not is_handler_error(GeneratorExit())
    assert is_handler_error(SystemExit(3))
