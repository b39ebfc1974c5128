"""What a handler's run raised: the handler's error, to answer its caller with, or the end of the
run itself (its task cancelled, its coroutine closed), which is no answer."""

from __future__ import annotations

import asyncio

__all__ = ["is_handler_error"]


def is_handler_error(exc: BaseException) -> bool:
    """Whether ``exc``, out of a handler's run, is its handler's error, answered like any other:
    every exception but the `CancelledError` of a task being cancelled (a deadline, a stop, its
    caller) and the ``GeneratorExit`` of a coroutine closed outside any task (a leaked one collected).
    Ask in the task that ran the handler.

    A `CancelledError` while the running task is not being cancelled is the handler's own: it raised
    one, or awaited something cancelled elsewhere. ``SystemExit`` and ``KeyboardInterrupt`` are the
    handler's own too (``sys.exit()`` in a library it calls; a real Ctrl-C goes to uvicorn's or
    asyncio's signal handler): answered, as uvicorn answers a route that raises one with a 500 and
    serves on. Raised on, out of the event loop, one would end the process, and its caller, hearing
    nothing, would try the next node and end that one too."""
    if isinstance(exc, Exception):
        return True
    task = _running_task()
    if isinstance(exc, asyncio.CancelledError):
        return task is not None and not task.cancelling()
    return task is not None or not isinstance(exc, GeneratorExit)


def _running_task() -> asyncio.Task[object] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no loop runs: a coroutine closed as it is collected
        return None
