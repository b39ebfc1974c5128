"""Run a coroutine in the caller's task, with a deadline only once it suspends.

A handler that returns without suspending (most in-process ones) costs a plain call: no task and
no timer. One that suspends is resumed in the same task inside ``asyncio.timeout``, so it is
cancelled at the deadline like any awaited call. The caller takes the first step itself
(``coro.send(None)``, see `LocalDispatcher.run_request`) and hands the rest to `finish`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

__all__ = ["DeadlinePassed", "finish"]

T = TypeVar("T")


class DeadlinePassed(Exception):
    """`finish` cancelled the coroutine at its deadline (not an error the coroutine raised)."""


async def finish(coro: Coroutine[Any, Any, T], suspended_on: Any, timeout: float | None) -> T:
    """Await the rest of ``coro``, which suspended on ``suspended_on`` in its first step; cancel it
    after ``timeout`` seconds if it is still running then.

    Raises:
        DeadlinePassed: the timeout fired (a TimeoutError the coroutine raised passes as it is).
        Exception: whatever ``coro`` raised.
    """
    if timeout is None:
        return await _Resume(coro, suspended_on)
    try:
        async with asyncio.timeout(timeout) as bound:
            return await _Resume(coro, suspended_on)
    except TimeoutError:
        if bound.expired():
            raise DeadlinePassed from None
        raise


class _Resume(Generic[T]):
    """Awaits the rest of a coroutine that has already taken its first step outside any task."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, T], first: Any) -> None:
        self._coro = coro
        self._first = first

    def __await__(self) -> Generator[Any, Any, T]:
        coro, signal = self._coro, self._first
        while True:
            thrown: BaseException | None = None
            sent: Any = None
            try:
                sent = yield signal  # hand the awaited future to the task, as `await` would
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # a cancellation, thrown in by the task
                thrown = exc
            try:
                signal = coro.send(sent) if thrown is None else coro.throw(thrown)
            except StopIteration as done:
                result: T = done.value
                return result
