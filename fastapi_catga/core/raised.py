"""What a handler's run raised: the handler's error, to answer its caller with, or the end of the
run itself (a cancellation, a process exit), which is no answer."""

from __future__ import annotations

import asyncio

__all__ = ["is_handler_error"]

#: What a run may raise that is no answer of its handler: a process exit, as asyncio sees it (it
#: goes on up, out of the event loop), and a coroutine being closed (its close must not be turned
#: into anything else). A handler that raises one itself gets no answer either.
_NOT_ANSWERS = (KeyboardInterrupt, SystemExit, GeneratorExit)


def is_handler_error(exc: BaseException) -> bool:
    """Whether ``exc``, out of a handler's run, is its handler's error, answered like any other: every
    `Exception`, and every other `BaseException` but `_NOT_ANSWERS` and the `CancelledError` of a
    task being cancelled (a deadline, a stop, its caller). A `CancelledError` while the running task
    is not being cancelled is the handler's own: it raised one, or awaited something cancelled
    elsewhere. Ask in the task that ran the handler."""
    if isinstance(exc, Exception):
        return True
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        return task is not None and not task.cancelling()
    return not isinstance(exc, _NOT_ANSWERS)
