"""Deadline-based polling for tests: assert that something happens *within* a time, never sleep-and-hope."""

from __future__ import annotations

import asyncio
import inspect
import io
import time
from collections.abc import Awaitable, Callable


def _timeout_error(
    message: str, elapsed: float, within: float, attempts: int, last_error: BaseException | None
) -> AssertionError:
    text = f"{message or 'condition was not met'} (still false after {elapsed:.3f}s, within={within}s, "
    text += f"{attempts} attempts)"
    if last_error is not None:
        text += f"; last error: {last_error!r}"
    return AssertionError(text)


async def eventually(
    predicate: Callable[[], Awaitable[bool] | bool],
    *,
    within: float,
    interval: float = 0.02,
    message: str = "",
    ignore: tuple[type[Exception], ...] = (),
) -> float:
    """Poll ``predicate`` (sync or async) until it is truthy; return the elapsed seconds.

    Raises AssertionError with ``message`` and the elapsed time once ``within`` seconds have passed.
    Exceptions of the ``ignore`` types count as "not yet" (the last one is reported on timeout).
    """
    start = time.monotonic()
    attempts = 0
    last_error: Exception | None = None
    while True:
        attempts += 1
        try:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return time.monotonic() - start
        except ignore as exc:
            last_error = exc
        elapsed = time.monotonic() - start
        if elapsed >= within:
            raise _timeout_error(message, elapsed, within, attempts, last_error)
        await asyncio.sleep(min(interval, within - elapsed))


def wait_until(
    predicate: Callable[[], bool],
    *,
    within: float,
    interval: float = 0.02,
    message: str = "",
    ignore: tuple[type[Exception], ...] = (),
) -> float:
    """Synchronous twin of :func:`eventually` (uses ``time.sleep``), e.g. for polling subprocesses."""
    start = time.monotonic()
    attempts = 0
    last_error: Exception | None = None
    while True:
        attempts += 1
        try:
            if predicate():
                return time.monotonic() - start
        except ignore as exc:
            last_error = exc
        elapsed = time.monotonic() - start
        if elapsed >= within:
            raise _timeout_error(message, elapsed, within, attempts, last_error)
        time.sleep(min(interval, within - elapsed))


async def finishes(step: Awaitable[object], *, within: float, what: str) -> None:
    """Await ``step`` for at most ``within`` seconds; past that, fail with the stack of every task
    of the loop, so that a hang in CI says where it hung."""
    task = asyncio.ensure_future(step)
    try:
        done, _ = await asyncio.wait([task], timeout=within)
        if done:
            task.result()
            return
        stacks = io.StringIO()
        for other in asyncio.all_tasks():
            if other is not asyncio.current_task():
                other.print_stack(limit=12, file=stacks)
        raise AssertionError(
            f"{what} did not finish within {within} s; the loop's tasks:\n{stacks.getvalue()}"
        )
    finally:
        task.cancel()  # done: nothing; cut short: the step goes no further
