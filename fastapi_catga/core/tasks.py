"""Stopping background tasks without trusting them to stop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

__all__ = ["cancel_and_wait"]

#: Seconds a cancelled task gets to end before a stop goes on without it.
CANCEL_GRACE = 2.0


async def cancel_and_wait(
    tasks: Iterable[asyncio.Task[object]], *, what: str, logger: logging.Logger, grace: float = CANCEL_GRACE
) -> None:
    """Cancel ``tasks`` and wait up to ``grace`` seconds for them to end.

    A task that swallows its cancellation (a library that catches it while it reconnects, a
    socket close that waits on a dead peer) must not hold up a stop: it is named in an error line
    and left behind. What the others raised is retrieved, so nothing is reported as never retrieved.
    """
    tasks = [task for task in tasks if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    done, stuck = await asyncio.wait(tasks, timeout=grace)
    for task in done:
        if not task.cancelled():
            task.exception()
    if stuck:
        logger.error(
            "%d %s task(s) did not end within %.1f s of being cancelled; going on without: %s",
            len(stuck),
            what,
            grace,
            ", ".join(sorted(task.get_name() for task in stuck)),
        )
