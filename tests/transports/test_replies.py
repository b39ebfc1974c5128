"""PendingReplies: one timer for every waiting request, each failed at its own deadline."""

from __future__ import annotations

import asyncio

import pytest

from fastapi_catga.exceptions import RequestTimeoutError, TransportError
from fastapi_catga.transports._replies import PendingReplies
from tests.virtual_time import run_virtual


def test_each_request_times_out_at_its_own_deadline_answered_ones_never() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pending: PendingReplies[str] = PendingReplies()
        started = loop.time()
        slow_token, slow = pending.add("slow", 5.0)
        answered_token, answered = pending.add("answered", 1.0)
        fast_token, fast = pending.add("fast", 2.0)  # later than one, earlier than the other
        pending.resolve(answered_token, "reply")
        assert await answered == "reply"
        pending.discard(answered_token)
        with pytest.raises(RequestTimeoutError, match="no reply on fast within 2.000 s"):
            await fast
        assert loop.time() - started == pytest.approx(2.0)
        assert not slow.done()
        with pytest.raises(RequestTimeoutError, match="no reply on slow within 5.000 s"):
            await slow
        assert loop.time() - started == pytest.approx(5.0)
        pending.discard(fast_token)
        pending.discard(slow_token)
        assert len(pending) == 0

    run_virtual(scenario())


def test_an_earlier_deadline_added_later_fires_first() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        pending: PendingReplies[str] = PendingReplies()
        started = loop.time()
        _, late = pending.add("late", 10.0)
        _, early = pending.add("early", 0.5)
        with pytest.raises(RequestTimeoutError):
            await early
        assert loop.time() - started == pytest.approx(0.5)
        assert not late.done()
        pending.fail_all(TransportError("connection lost"))
        with pytest.raises(TransportError):
            await late

    run_virtual(scenario())


def test_answered_requests_do_not_pile_up() -> None:
    """Each answered request leaves a deadline entry behind; the heap is rebuilt before they
    outnumber the waiting ones twice over (past a few hundred), so it stays bounded."""

    async def scenario() -> None:
        pending: PendingReplies[int] = PendingReplies()
        held = [pending.add("held", 60.0)[0] for _ in range(10)]
        for n in range(5_000):
            token, reply = pending.add("quick", 30.0)
            pending.resolve(token, n)
            assert await reply == n
            pending.discard(token)
            assert len(pending._deadlines) <= 257
        assert len(pending) == len(held)
        for token in held:
            pending.discard(token)

    run_virtual(scenario())


def test_a_reply_after_the_deadline_is_dropped() -> None:
    async def scenario() -> None:
        pending: PendingReplies[str] = PendingReplies()
        token, reply = pending.add("late", 0.1)
        with pytest.raises(RequestTimeoutError):
            await reply
        pending.resolve(token, "too late")  # no InvalidStateError
        pending.discard(token)
        pending.resolve(token, "after discard")  # nobody waits: dropped

    run_virtual(scenario())
