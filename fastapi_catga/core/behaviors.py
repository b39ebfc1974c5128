"""Built-in pipeline behaviors: logging, timeout, retry and idempotency."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from fastapi_catga.core.messages import Message, Request
from fastapi_catga.core.pipeline import CallNext
from fastapi_catga.exceptions import CatgaError, RequestTimeoutError

__all__ = [
    "DoneRecords",
    "IdempotencyBehavior",
    "LoggingBehavior",
    "RetryBehavior",
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
        started = time.perf_counter()
        try:
            result = await call_next()
        except Exception:
            self._logger.exception(
                "%s %s failed after %.1f ms",
                message.type_name,
                message.message_id,
                (time.perf_counter() - started) * 1e3,
            )
            raise
        self._logger.log(
            self._level,
            "%s %s handled in %.1f ms",
            message.type_name,
            message.message_id,
            (time.perf_counter() - started) * 1e3,
        )
        return result


class TimeoutBehavior:
    """Cancels a handler that runs longer than ``seconds`` and raises `RequestTimeoutError`."""

    def __init__(self, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError("TimeoutBehavior needs a positive number of seconds")
        self._seconds = seconds

    async def __call__(self, message: Message, call_next: CallNext) -> Any:
        try:
            async with asyncio.timeout(self._seconds) as deadline:
                return await call_next()
        except TimeoutError as exc:
            if isinstance(exc, CatgaError) or not deadline.expired():
                raise  # a timeout of the handler's own (or a Catga one), not this behavior's
            raise RequestTimeoutError(
                f"{message.type_name} handler ran over its {self._seconds:g} s timeout"
            ) from exc


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
        for attempt in range(1, self._attempts + 1):
            try:
                return await call_next()
            except Exception as exc:
                if attempt == self._attempts or not is_retryable(exc):
                    raise
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
        raise AssertionError("unreachable")  # pragma: no cover


class DoneRecords(Protocol):
    """Cluster-wide done records and leases (a transport's ``durable`` store is one)."""

    async def done(self, key: str) -> bytes | None: ...

    async def claim(self, key: str, holder: str, ttl: float) -> bool: ...

    async def release(self, key: str, holder: str) -> None: ...

    async def commit(self, key: str, holder: str, result: bytes, ttl: float) -> bool: ...


class IdempotencyBehavior:
    """Runs a handler at most once per message id within ``window`` seconds, across the cluster.

    A duplicate gets the first run's result without running the handler again; a duplicate that
    arrives while the first run is still going waits for it. A run that raised is forgotten, so a
    retry can succeed. In a running node the first run's result is kept as a done record on the
    broker, so a duplicate handled by another node is answered from it too (a run that outlasts
    ``lease`` seconds may be started again elsewhere). In this process, at most ``max_entries``
    ids are remembered, oldest dropped first.
    """

    def __init__(
        self,
        window: float = 120.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        lease: float = 30.0,
    ) -> None:
        self._window = window
        self._max_entries = max_entries
        self._clock = clock
        self._lease = lease
        self._seen: OrderedDict[tuple[str, str], tuple[float, asyncio.Future[Any]]] = OrderedDict()
        self._records: DoneRecords | None = None
        self._holder = ""

    def share(self, records: DoneRecords, holder: str) -> None:
        """Keep results in the cluster's done records (the node does this at start-up)."""
        self._records, self._holder = records, holder

    async def __call__(self, message: Message, call_next: CallNext) -> Any:
        key = (message.type_name, message.message_id)
        while True:
            now = self._clock()
            self._expire(now)
            entry = self._seen.get(key)
            if entry is None:
                break
            try:
                return await asyncio.shield(entry[1])
            except asyncio.CancelledError:
                if not entry[1].cancelled():
                    raise  # this caller was cancelled, not the run it waited for
                # The run it waited for was cancelled (its caller gave up): run it here instead.
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._seen[key] = (now, future)
        try:
            result = await (
                call_next() if self._records is None else self._once_in_cluster(message, call_next)
            )
        except asyncio.CancelledError:
            self._seen.pop(key, None)
            future.cancel()
            raise
        except Exception as exc:
            self._seen.pop(key, None)
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it, nobody else needs to
            raise
        future.set_result(result)
        return result

    async def _once_in_cluster(self, message: Message, call_next: CallNext) -> Any:
        records, holder = self._records, f"{self._holder}:{os.urandom(6).hex()}"  # this run's own claim
        assert records is not None
        key = f"idempotency:{message.type_name}:{message.message_id}"
        adapter = type(message).result_adapter() if isinstance(message, Request) else None
        while True:
            done = await records.done(key)
            if done is not None:
                return None if adapter is None else adapter.validate_json(done)
            if await records.claim(key, holder, self._lease):
                break
            await asyncio.sleep(0.05)  # another node runs it now: wait for its record, or its lease
        try:
            result = await call_next()
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.shield(records.release(key, holder))
            raise
        encoded = b"null" if adapter is None else adapter.dump_json(result)
        await records.commit(key, holder, encoded, self._window)
        return result

    def _expire(self, now: float) -> None:
        while self._seen:
            stamp, future = next(iter(self._seen.values()))
            expired = future.done() and now - stamp > self._window
            if not expired and len(self._seen) <= self._max_entries:
                return
            self._seen.popitem(last=False)
