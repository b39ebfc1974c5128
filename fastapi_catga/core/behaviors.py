"""Built-in pipeline behaviors: logging, timeout, retry and idempotency."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from collections.abc import Callable
from typing import Any

from fastapi_catga.core.deadlines import DeadlinePassed, Deadlines
from fastapi_catga.core.idempotency import DoneRecords, IdempotencyBehavior, TakesLeases
from fastapi_catga.core.logs import log_bounded
from fastapi_catga.core.messages import Message
from fastapi_catga.core.pipeline import CallNext, Pipeline, as_pipeline
from fastapi_catga.exceptions import RequestTimeoutError

__all__ = [
    "DoneRecords",
    "IdempotencyBehavior",
    "LoggingBehavior",
    "RetryBehavior",
    "TakesLeases",
    "TimeoutBehavior",
    "is_retryable",
]

logger = logging.getLogger(__name__)


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt may succeed: a `CatgaError` (or any exception) with ``retryable = True``."""
    return bool(getattr(exc, "retryable", False))


class LoggingBehavior:
    """Logs each handled message with its duration, and failures with their traceback."""

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.DEBUG) -> None:
        self._logger = logger or logging.getLogger("fastapi_catga.handlers")
        self._level = level

    async def __call__(self, message: Message, call_next: CallNext) -> Any:
        return await self.compose(as_pipeline(call_next))(message)

    def compose(self, inner: Pipeline) -> Pipeline:
        """The behavior around ``inner``, one coroutine per call (see `PipelineBehavior`)."""
        log, level, clock = self._logger, self._level, time.perf_counter

        async def logged(message: Message) -> Any:
            started = clock()
            try:
                result = await inner(message)
            except Exception as exc:
                log_bounded(
                    log, logging.ERROR, "%s %s failed after %.1f ms",
                    message.type_name, message.message_id, (clock() - started) * 1e3, exc=exc,
                )  # fmt: skip
                raise
            if log.isEnabledFor(level):  # the check `log.log` makes, without formatting the args
                log.log(
                    level,
                    "%s %s handled in %.1f ms",
                    message.type_name,
                    message.message_id,
                    (clock() - started) * 1e3,
                )
            return result

        return logged


class TimeoutBehavior:
    """Cancels a handler that runs longer than ``seconds`` and raises `RequestTimeoutError`.

    Args:
        seconds: the handler's budget.
        clock: seconds, monotonic, at the event loop's pace (a virtual loop's ``loop.time``).
    """

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        if seconds <= 0:
            raise ValueError("TimeoutBehavior needs a positive number of seconds")
        self._seconds = seconds
        self._clock = clock
        # Calls through `__call__` (pipelines call `compose`'s step): one timer per event loop.
        self._called: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Deadlines] = (
            weakref.WeakKeyDictionary()
        )

    async def __call__(self, message: Message, call_next: CallNext) -> Any:
        loop = asyncio.get_running_loop()
        deadlines = self._called.get(loop)
        if deadlines is None:
            deadlines = self._called[loop] = Deadlines(self._clock)
        try:
            return await deadlines.run(call_next(), self._seconds, keep_late=True)  # type: ignore[arg-type]
        except DeadlinePassed:
            raise self._ran_over(message) from TimeoutError()

    def compose(self, inner: Pipeline) -> Pipeline:
        """The behavior around ``inner``, one coroutine per call (see `PipelineBehavior`): no
        timer per call, one per pipeline (`Deadlines`)."""
        seconds, deadlines = self._seconds, Deadlines(self._clock)

        async def bounded(message: Message) -> Any:
            try:
                # A result the handler returned late is kept: it ran, and no one has moved on.
                return await deadlines.run(inner(message), seconds, keep_late=True)
            except DeadlinePassed:
                raise self._ran_over(message) from TimeoutError()

        return bounded

    def _ran_over(self, message: Message) -> RequestTimeoutError:
        return RequestTimeoutError(f"{message.type_name} handler ran over its {self._seconds:g} s timeout")


class RetryBehavior:
    """Retries a handler that raised a retryable error, with jittered exponential backoff.

    Errors are retryable when they carry ``retryable = True`` (`RetryableError` does); any other
    error is raised at once.
    """

    def __init__(self, attempts: int = 3, backoff: float = 0.05, max_backoff: float = 2.0) -> None:
        if attempts < 1:
            raise ValueError("RetryBehavior needs at least 1 attempt")
        self._attempts = attempts
        self._backoff = backoff
        self._max_backoff = max_backoff

    async def __call__(self, message: Message, call_next: CallNext) -> Any:
        return await self.compose(as_pipeline(call_next))(message)

    def compose(self, inner: Pipeline) -> Pipeline:
        """The behavior around ``inner``, one coroutine per call (see `PipelineBehavior`)."""
        retry = self._retry

        async def retried(message: Message) -> Any:
            try:
                return await inner(message)
            except Exception as exc:
                if self._attempts == 1 or not is_retryable(exc):
                    raise
                return await retry(message, inner, exc)

        return retried

    async def _retry(self, message: Message, inner: Pipeline, exc: Exception) -> Any:
        """The attempts after a first one that raised the retryable ``exc``."""
        attempt = 1
        while True:
            delay = min(self._max_backoff, self._backoff * 2 ** (attempt - 1))
            logger.info(
                "%s %s: attempt %d failed (%s), retrying in %.3f s",
                message.type_name,
                message.message_id,
                attempt,
                exc,
                delay,
            )
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            attempt += 1
            try:
                return await inner(message)
            except Exception as error:
                if attempt == self._attempts or not is_retryable(error):
                    raise
                exc = error
