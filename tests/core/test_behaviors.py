"""The built-in behaviors: logging, timeout, retry and idempotency."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from fastapi_catga import (
    CallNext,
    ConfigurationError,
    Event,
    IdempotencyBehavior,
    LoggingBehavior,
    Message,
    RemoteHandlerError,
    RequestTimeoutError,
    RetryableError,
    RetryBehavior,
    TimeoutBehavior,
    TransportError,
)
from fastapi_catga.core.pipeline import build_pipeline
from fastapi_catga.testing import InMemoryBroker, memory_node
from tests.core.pipeline_sample import Counter, POther, PPing, echo
from tests.polling import eventually


class PNoted(Event):
    """An event two handlers share."""


class Entered:
    """Counts messages that entered the pipeline (their task has reached the inner behaviors)."""

    def __init__(self) -> None:
        self.count = 0

    async def __call__(self, message: Message, call_next: CallNext) -> Any:
        self.count += 1
        return await call_next()


# -- LoggingBehavior ----------------------------------------------------------------------------------


async def test_logging_behavior_logs_each_handled_message(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fastapi_catga.handlers")
    message = PPing(message_id="log-1")
    assert await build_pipeline(echo, [LoggingBehavior()], PPing)(message) == "handled ping"
    [record] = [r for r in caplog.records if r.name == "fastapi_catga.handlers"]
    assert record.levelno == logging.DEBUG
    assert record.getMessage().startswith("PPing log-1 handled in ")


async def test_logging_behavior_uses_the_given_logger_and_level(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tests.audit")
    behavior = LoggingBehavior(logging.getLogger("tests.audit"), level=logging.INFO)
    await build_pipeline(echo, [behavior], PPing)(PPing())
    assert [(r.name, r.levelno) for r in caplog.records] == [("tests.audit", logging.INFO)]


async def test_logging_behavior_logs_failures_with_traceback(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fastapi_catga.handlers")
    error = ValueError("broken")
    with pytest.raises(ValueError) as info:
        await build_pipeline(Counter(error), [LoggingBehavior()], PPing)(PPing(message_id="log-2"))
    assert info.value is error
    [record] = [r for r in caplog.records if r.name == "fastapi_catga.handlers"]
    assert record.levelno == logging.ERROR
    assert "PPing log-2 failed after" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[1] is error
    assert record.pathname.endswith("behaviors.py"), "the line that logged it, not the helper's"


async def test_logging_behavior_bounds_a_huge_error_text(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="fastapi_catga.handlers")
    with pytest.raises(ValueError):
        await build_pipeline(Counter(ValueError("E" * 5_000_000)), [LoggingBehavior()], PPing)(PPing())
    assert 1000 < len(caplog.text) < 40_000


# -- TimeoutBehavior ----------------------------------------------------------------------------------


async def test_timeout_behavior_cancels_a_slow_handler() -> None:
    cancelled = asyncio.Event()

    async def stuck(message: PPing) -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "never"

    with pytest.raises(RequestTimeoutError, match="PPing handler ran over its 0.05 s timeout") as info:
        await build_pipeline(stuck, [TimeoutBehavior(0.05)], PPing)(PPing())
    assert isinstance(info.value, TimeoutError)
    assert cancelled.is_set()


async def test_timeout_behavior_passes_fast_results_and_catga_timeouts_through() -> None:
    assert await build_pipeline(echo, [TimeoutBehavior(5)], PPing)(PPing()) == "handled ping"
    inner = RequestTimeoutError("downstream timed out")
    with pytest.raises(RequestTimeoutError) as info:
        await build_pipeline(Counter(inner), [TimeoutBehavior(5)], PPing)(PPing())
    assert info.value is inner


async def test_timeout_behavior_leaves_the_handlers_own_timeout_error_alone() -> None:
    own = TimeoutError("database did not answer")
    with pytest.raises(TimeoutError) as info:
        await build_pipeline(Counter(own), [TimeoutBehavior(5)], PPing)(PPing())
    assert info.value is own


@pytest.mark.parametrize("seconds", [0, -1])
def test_timeout_behavior_needs_a_positive_timeout(seconds: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        TimeoutBehavior(seconds)


# -- RetryBehavior ------------------------------------------------------------------------------------


async def test_retry_behavior_retries_retryable_errors_until_success() -> None:
    handle = Counter(RetryableError("busy"), TransportError("blip"), result="ok")
    assert await build_pipeline(handle, [RetryBehavior(attempts=3, backoff=0)], PPing)(PPing()) == "ok"
    assert handle.calls == 3


async def test_retry_behavior_retries_anything_marked_retryable() -> None:
    handle = Counter(RemoteHandlerError("flaky", retryable=True), result="ok")
    assert await build_pipeline(handle, [RetryBehavior(backoff=0)], PPing)(PPing()) == "ok"
    assert handle.calls == 2


async def test_retry_behavior_gives_up_after_the_attempts() -> None:
    last = RetryableError("third")
    handle = Counter(RetryableError("first"), RetryableError("second"), last)
    with pytest.raises(RetryableError) as info:
        await build_pipeline(handle, [RetryBehavior(attempts=3, backoff=0)], PPing)(PPing())
    assert info.value is last
    assert handle.calls == 3


@pytest.mark.parametrize("error", [ValueError("bad"), RemoteHandlerError("bad"), RequestTimeoutError("slow")])
async def test_retry_behavior_does_not_retry_other_errors(error: Exception) -> None:
    handle = Counter(error, result="ok")
    with pytest.raises(type(error)):
        await build_pipeline(handle, [RetryBehavior(attempts=5, backoff=0)], PPing)(PPing())
    assert handle.calls == 1


def test_retry_behavior_needs_an_attempt() -> None:
    with pytest.raises(ValueError, match="at least 1 attempt"):
        RetryBehavior(attempts=0)


# -- IdempotencyBehavior ------------------------------------------------------------------------------


async def test_idempotency_returns_the_first_result_for_a_duplicate() -> None:
    handle = Counter(result="first")
    pipeline = build_pipeline(handle, [IdempotencyBehavior()], PPing)
    assert await pipeline(PPing(message_id="dup")) == "first"
    handle.result = "second"
    assert await pipeline(PPing(message_id="dup", text="changed")) == "first"
    assert handle.calls == 1
    assert await pipeline(PPing(message_id="fresh")) == "second"
    assert handle.calls == 2


async def test_idempotency_keys_on_type_and_id() -> None:
    behavior = IdempotencyBehavior()
    ping, query = Counter(result="ping"), Counter(result="query")
    assert await build_pipeline(ping, [behavior], PPing)(PPing(message_id="k")) == "ping"
    assert await build_pipeline(query, [behavior], POther)(POther(message_id="k")) == "query"
    assert (ping.calls, query.calls) == (1, 1)


async def test_idempotency_leaves_events_to_run_in_every_handler() -> None:
    """An event's id is shared by all its handlers, on every node: it is not a request's key."""
    assert IdempotencyBehavior.applies_to(PPing) and not IdempotencyBehavior.applies_to(PNoted)
    seen: list[str] = []

    async def first(event: PNoted) -> None:
        seen.append("first")

    async def second(event: PNoted) -> None:
        seen.append("second")

    behavior, event = IdempotencyBehavior(), PNoted()
    for handle in (first, second, first):
        await build_pipeline(handle, [behavior], PNoted)(event)
    assert seen == ["first", "second", "first"]


class CommitsAfterFirstLook:
    """Done records where another node's run commits (its record written, then its lease let go)
    right after the first lookup: the window between a lookup and a claim."""

    def __init__(self) -> None:
        self.committed = False
        self.released: list[str] = []

    async def done(self, key: str) -> bytes | None:
        record, self.committed = (b'"pong"' if self.committed else None), True
        return record

    async def claim(self, key: str, holder: str, ttl: float) -> bool:
        return self.committed

    async def release(self, key: str, holder: str) -> None:
        self.released.append(holder)

    async def commit(self, key: str, holder: str, result: bytes, ttl: float) -> bool:
        raise AssertionError("the handler ran again")


async def test_idempotency_reads_the_record_once_it_holds_the_claim() -> None:
    records, ran = CommitsAfterFirstLook(), []

    async def handle(message: PPing) -> str:
        ran.append(message.text)
        return "ran again"

    behavior = IdempotencyBehavior()
    behavior.share(records, "node-a")
    assert await build_pipeline(handle, [behavior], PPing)(PPing()) == "pong"
    assert ran == [] and len(records.released) == 1


async def test_idempotency_runs_concurrent_duplicates_once() -> None:
    gate = asyncio.Event()
    calls = 0

    async def slow(message: PPing) -> str:
        nonlocal calls
        calls += 1
        await gate.wait()
        return f"run {calls}"

    pipeline = build_pipeline(slow, [IdempotencyBehavior()], PPing)
    tasks = [asyncio.ensure_future(pipeline(PPing(message_id="same"))) for _ in range(3)]
    await eventually(lambda: calls == 1, within=2)
    assert not any(task.done() for task in tasks)
    gate.set()
    assert await asyncio.gather(*tasks) == ["run 1", "run 1", "run 1"]
    assert calls == 1


async def test_idempotency_forgets_a_failed_run() -> None:
    handle = Counter(ValueError("first try fails"), result="ok")
    pipeline = build_pipeline(handle, [IdempotencyBehavior()], PPing)
    with pytest.raises(ValueError):
        await pipeline(PPing(message_id="retry-me"))
    assert await pipeline(PPing(message_id="retry-me")) == "ok"
    assert handle.calls == 2


@pytest.mark.parametrize("raised", [ValueError("failed"), asyncio.CancelledError("the handler's own")])
async def test_idempotency_waiters_of_a_failed_run_get_its_error(raised: BaseException) -> None:
    """A handler's own CancelledError (its task is not being cancelled) is an error like any other:
    its waiting duplicate gets it, and does not run the handler again."""
    gate = asyncio.Event()
    error = raised
    entered = Entered()
    calls = 0

    async def failing(message: PPing) -> str:
        nonlocal calls
        calls += 1
        await gate.wait()
        raise error

    pipeline = build_pipeline(failing, [entered, IdempotencyBehavior()], PPing)
    first = asyncio.ensure_future(pipeline(PPing(message_id="x")))
    duplicate = asyncio.ensure_future(pipeline(PPing(message_id="x")))
    await eventually(lambda: entered.count == 2, within=2)  # the duplicate waits on the first run
    gate.set()
    results = await asyncio.gather(first, duplicate, return_exceptions=True)
    # The duplicate gets the first run's error, not a second run (a task that a CancelledError
    # ends counts as cancelled: gather shows a new one).
    assert all(isinstance(result, type(error)) for result in results)
    assert calls == 1


async def test_idempotency_duplicate_of_a_cancelled_run_runs_it_itself() -> None:
    entered = Entered()
    calls = 0

    async def slow(message: PPing) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.Event().wait()  # the first run hangs until its caller gives up
        return f"run {calls}"

    pipeline = build_pipeline(slow, [entered, IdempotencyBehavior()], PPing)
    first = asyncio.ensure_future(pipeline(PPing(message_id="c")))
    duplicate = asyncio.ensure_future(pipeline(PPing(message_id="c")))
    await eventually(lambda: entered.count == 2 and calls == 1, within=2)
    first.cancel()
    # The duplicate's own task was not cancelled: it must not end with CancelledError.
    assert await duplicate == "run 2"
    assert first.cancelled()


async def test_idempotency_entries_expire_after_the_window() -> None:
    now = [1000.0]
    handle = Counter(result="r")
    pipeline = build_pipeline(handle, [IdempotencyBehavior(window=60, clock=lambda: now[0])], PPing)
    await pipeline(PPing(message_id="w"))
    now[0] += 60
    await pipeline(PPing(message_id="w"))
    assert handle.calls == 1
    now[0] += 0.001
    await pipeline(PPing(message_id="w"))
    assert handle.calls == 2


async def test_idempotency_remembers_at_most_max_entries() -> None:
    handle = Counter(result="r")
    pipeline = build_pipeline(handle, [IdempotencyBehavior(max_entries=2)], PPing)
    for message_id in ["a", "b", "c", "c", "b"]:
        await pipeline(PPing(message_id=message_id))
    assert handle.calls == 3
    await pipeline(PPing(message_id="a"))  # the oldest was dropped to keep two
    assert handle.calls == 4


# -- called directly ----------------------------------------------------------------------------------


async def test_each_builtin_behavior_called_directly_does_what_its_composed_step_does() -> None:
    """A behavior called as ``behavior(message, call_next)`` (by a custom pipeline) behaves as the
    step `build_pipeline` composes from it."""
    message = PPing(message_id="direct")
    handle = Counter(RetryableError("busy"), result="ok")
    assert await RetryBehavior(backoff=0)(message, lambda: handle(message)) == "ok"
    assert handle.calls == 2
    assert await LoggingBehavior()(message, lambda: echo(message)) == "handled ping"
    assert await TimeoutBehavior(5)(message, lambda: echo(message)) == "handled ping"
    with pytest.raises(RequestTimeoutError, match="ran over its 0.01 s timeout"):
        await TimeoutBehavior(0.01)(message, lambda: asyncio.sleep(5))
    idempotent, once = IdempotencyBehavior(), Counter(result="first")
    assert await idempotent(message, lambda: once(message)) == "first"
    assert await idempotent(message, lambda: once(message)) == "first"
    assert once.calls == 1


async def test_timeout_behavior_counts_the_first_step_in_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """The handler's first step runs before any timer, but the time it took is part of the budget."""
    loop = asyncio.get_running_loop()
    real_time = loop.time

    async def slow_start(message: PPing) -> str:
        # A synchronous first step that takes 1.5 s of the loop's time, more than the whole timeout.
        monkeypatch.setattr(loop, "time", lambda: real_time() + 1.5)
        await asyncio.sleep(0.01)
        return "in time only if the first step were free"

    with pytest.raises(RequestTimeoutError):
        await build_pipeline(slow_start, [TimeoutBehavior(1.0, clock=lambda: loop.time())], PPing)(PPing())


@pytest.mark.parametrize("twice", ["one instance", "two instances"])
def test_idempotency_listed_twice_is_refused_at_build(twice: str) -> None:
    """The inner one would wait for the outer one's run to finish: every send would hang."""
    once = IdempotencyBehavior()
    behaviors = [once, once] if twice == "one instance" else [once, IdempotencyBehavior()]
    with pytest.raises(ConfigurationError, match="IdempotencyBehavior is listed 2 times"):
        memory_node(InMemoryBroker(), handlers=[echo], behaviors=behaviors)
