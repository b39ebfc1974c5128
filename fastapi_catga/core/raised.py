"""What a handler's run raised: the handler's error, to answer its caller with, or the end of the
run itself (its task cancelled, its coroutine closed), which is no answer."""

from __future__ import annotations

import asyncio
import contextvars

__all__ = ["is_handler_error", "owned_run"]

#: True in a run catga started for a delivery from the broker (a request, an event, a durable
#: message), in that run's own context: nothing but catga holds its coroutine, so a
#: ``GeneratorExit`` there is its handler's, never a close.
_OWNED = contextvars.ContextVar("catga_owned_run", default=False)


def owned_run() -> None:
    """Mark the running context as a run catga owns (see `_OWNED`); call it first thing in the run."""
    _OWNED.set(True)


def is_handler_error(exc: BaseException) -> bool:
    """Whether ``exc``, out of a handler's run, is its handler's error, answered like any other:
    every exception but the `CancelledError` of a task being cancelled (a deadline, a stop, its
    caller), and ``GeneratorExit`` outside a run catga owns (a caller's coroutine being closed: its
    close must not turn into anything else). Ask in the task that ran the handler.

    A `CancelledError` while the running task is not being cancelled is the handler's own: it raised
    one, or awaited something cancelled elsewhere. ``SystemExit`` and ``KeyboardInterrupt`` are
    answered too (``sys.exit()`` in a library the handler calls), as uvicorn answers a route that
    raises one with a 500 and serves on: raised on, out of the event loop, one would end the node's
    process, and its caller, hearing nothing, would try the next node and end that one too. Under
    uvicorn, signals go to its handlers and never land in a handler's frame; under a bare
    ``asyncio.run``, a second Ctrl-C that lands in one is answered, and a third stops the process."""
    if isinstance(exc, Exception):
        return True
    if isinstance(exc, asyncio.CancelledError):
        task = _running_task()
        return task is not None and not task.cancelling()
    return not isinstance(exc, GeneratorExit) or _OWNED.get()


def _running_task() -> asyncio.Task[object] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no loop runs: a coroutine closed as it is collected
        return None
