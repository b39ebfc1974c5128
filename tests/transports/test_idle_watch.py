"""The Redis reader's idle watch, on a virtual clock: it ends a read only after a whole interval
with nothing received, within a quarter interval of that, and never while messages come."""

from __future__ import annotations

import asyncio

import pytest

from fastapi_catga.transports.redis.reader import _IdleWatch
from tests.virtual_time import run_virtual

INTERVAL = 0.2


async def read_until_idle(messages_until: float, every: float = 0.05) -> float:
    """A 'read' (a future nobody sets) under the watch, while a feeder counts a message every
    ``every`` seconds until ``messages_until``; the loop time at which the watch ended the read."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(None) as idle:
            watch = _IdleWatch(loop, INTERVAL, idle)

            async def feed() -> None:
                while loop.time() - started < messages_until:
                    await asyncio.sleep(every)
                    watch.received += 1

            feeder = asyncio.create_task(feed())
            try:
                await loop.create_future()  # the read: only the watch ends it
            finally:
                watch.stop()
                feeder.cancel()
    return loop.time() - started


def test_a_silent_connection_is_noticed_after_one_interval() -> None:
    ended = run_virtual(read_until_idle(messages_until=0))
    assert INTERVAL <= ended <= 1.25 * INTERVAL + 1e-9


def test_messages_keep_the_read_going_and_silence_then_ends_it() -> None:
    ended = run_virtual(read_until_idle(messages_until=2.0))  # ten intervals of messages
    last_message = 2.0
    assert last_message + INTERVAL <= ended + 0.05  # the last message came at most `every` before 2.0
    assert ended <= last_message + 1.25 * INTERVAL + 1e-9


def test_a_message_just_before_the_interval_ends_defers_the_end() -> None:
    # Messages every 0.19 s (just under the interval): never idle while they come.
    ended = run_virtual(read_until_idle(messages_until=1.0, every=0.19))
    assert ended >= 1.0


def test_stop_leaves_no_timer_behind() -> None:
    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(None) as idle:
            watch = _IdleWatch(loop, INTERVAL, idle)
            watch.stop()
        await asyncio.sleep(INTERVAL * 3)  # a timer left would end nothing, but would still run
        return len([h for h in loop._scheduled if not h.cancelled()])  # type: ignore[attr-defined]

    assert run_virtual(scenario()) == 0
