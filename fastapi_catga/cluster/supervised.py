"""`supervised`: a loop that a bug cannot end silently."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable

__all__ = ["supervised"]

logger = logging.getLogger(__name__)


async def supervised(
    name: str, step: Callable[[], Awaitable[None]], *, pause: float, failures: Counter[str]
) -> None:
    """Run ``step`` again and again until cancelled. An unexpected error is logged with its traceback,
    counted in ``failures[name]`` and followed by a pause that doubles (from ``pause`` up to 30 s)
    until a step succeeds again, so heartbeats and evictions go on after a bug, without spinning."""
    delay = pause
    while True:
        try:
            await step()
            delay = pause
        except Exception:
            failures[name] += 1
            logger.exception("the %s loop failed; going on in %.2f s", name, delay)
            await asyncio.sleep(delay)
            delay = min(30.0, delay * 2)
