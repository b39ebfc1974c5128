"""`IdempotencyBehavior`: a handler runs at most once per message id, across the cluster."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

from fastapi_catga.core.messages import Message, Request
from fastapi_catga.core.pipeline import CallNext, Pipeline, as_pipeline
from fastapi_catga.core.raised import is_handler_error

__all__ = ["DoneRecords", "IdempotencyBehavior", "TakesLeases"]

#: A message's type name and id in one string: its hash is computed once and kept by the string
#: (a tuple's is computed again on each of the four dict operations of a run, ~400 instructions each).
_Key = str
_UNKNOWN: Any = object()


class DoneRecords(Protocol):
    """Cluster-wide done records and leases (a transport's ``durable`` store is one)."""

    async def done(self, key: str) -> bytes | None: ...

    async def claim(self, key: str, holder: str, ttl: float) -> bool: ...

    async def release(self, key: str, holder: str) -> None: ...

    async def commit(self, key: str, holder: str, result: bytes, ttl: float) -> bool: ...


@runtime_checkable
class TakesLeases(DoneRecords, Protocol):
    """Done records that look a record up and claim its lease in one call (the transports' are)."""

    async def take(self, key: str, holder: str, ttl: float) -> bytes | bool:
        """The done record under ``key`` if there is one; else whether ``holder`` has the lease now."""
        ...


def taker(records: DoneRecords) -> Callable[[str, str, float], Awaitable[bytes | bool]]:
    """``records.take``, or the same made of `claim` and then `done` (a record is looked up once
    the lease is held: a commit writes it before it lets the lease go, so a run that ended just
    before the claim is seen, never run a second time)."""
    if isinstance(records, TakesLeases):
        return records.take

    async def take(key: str, holder: str, ttl: float) -> bytes | bool:
        if not await records.claim(key, holder, ttl):
            done = await records.done(key)
            return False if done is None else done
        if (done := await records.done(key)) is None:
            return True
        with contextlib.suppress(Exception):
            await records.release(key, holder)
        return done

    return take


class IdempotencyBehavior:
    """Runs a handler at most once per message id within ``window`` seconds, across the cluster.

    A duplicate gets the first run's result without running the handler again; a duplicate that
    arrives while the first run is still going waits for it. A run that raised is forgotten, so a
    retry can succeed. In a running node the first run's result is kept as a done record on the
    broker, so a duplicate handled by another node is answered from it too (a run that outlasts
    ``lease`` seconds may be started again elsewhere). In this process, at most ``max_entries``
    ids are remembered, oldest dropped first.

    It applies to commands and queries only: an event's handlers each run, on every node (a
    durable event's runs have their own dedup window).
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
        #: Finished runs, oldest first: when each started, and its result.
        self._done: OrderedDict[_Key, tuple[float, Any]] = OrderedDict()  # (a dict slows down
        # to O(n) per `next(iter(...))` once its oldest entries are deleted: not this one)
        #: Runs going on; a future only once a duplicate waits for one (most never get one).
        self._running: dict[_Key, asyncio.Future[Any] | None] = {}
        self._sweep_at = 0.0
        self._records: DoneRecords | None = None
        self._take: Callable[[str, str, float], Awaitable[bytes | bool]] | None = None
        self._holder = ""
        self._runs = itertools.count()
        self._adapters: dict[type[Message], Any] = {}

    def share(self, records: DoneRecords, holder: str) -> None:
        """Keep results in the cluster's done records (the node does this at start-up)."""
        # Each run claims as a holder of its own: this node, this process's incarnation, a count.
        self._records, self._holder = records, f"{holder}:{os.urandom(4).hex()}"
        self._take = taker(records)

    @staticmethod
    def applies_to(message_type: type[Message]) -> bool:
        """Requests only: an event shares its id between all its handlers, on every node."""
        return issubclass(message_type, Request)

    async def __call__(self, message: Message, call_next: CallNext) -> Any:
        return await self.compose(as_pipeline(call_next))(message)

    def compose(self, inner: Pipeline) -> Pipeline:
        """The behavior around ``inner``, one coroutine per call (see `PipelineBehavior`).

        Nothing is swept per call: an entry past the window is dropped when it is looked up,
        and the oldest ones every eighth of a window.
        """
        done, running, window, clock = self._done, self._running, self._window, self._clock

        async def once(message: Message) -> Any:
            key = f"{message.type_name}\x00{message.message_id}"
            now = clock()
            if now >= self._sweep_at:
                self._sweep(now)
            entry = done.get(key)
            if entry is not None and now - entry[0] <= window:
                return entry[1]
            if entry is not None or key in running:
                return await self._again(key, message, inner)
            # A first run (the usual case), inline: `_again` has the same steps.
            running[key] = None
            try:
                result = await (inner(message) if self._records is None else self._in_cluster(message, inner))
            except BaseException as exc:
                self._failed(key, exc)
                raise
            self._finished(key, now, result)
            return result

        return once

    async def _again(self, key: _Key, message: Message, inner: Pipeline) -> Any:
        """A message id seen before: wait for its run, or run it once more if that is over."""
        done, running = self._done, self._running
        while True:
            now = self._clock()
            entry = done.get(key)
            if entry is not None:
                if now - entry[0] <= self._window:
                    return entry[1]
                del done[key]
            if key not in running:
                break
            future = running[key]
            if future is None:
                future = running[key] = asyncio.get_running_loop().create_future()
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                if not future.cancelled():
                    raise  # this caller was cancelled, not the run it waited for
                # The run it waited for was cancelled (its caller gave up): run it here instead.
        running[key] = None
        try:
            result = await (inner(message) if self._records is None else self._in_cluster(message, inner))
        except BaseException as exc:
            self._failed(key, exc)
            raise
        self._finished(key, now, result)
        return result

    def _finished(self, key: _Key, started: float, result: Any) -> None:
        future = self._running.pop(key, None)
        done = self._done
        done[key] = (started, result)
        if len(done) > self._max_entries:
            done.popitem(last=False)
        if future is not None:
            future.set_result(result)

    def _failed(self, key: _Key, exc: BaseException) -> None:
        """A run that raised is forgotten; its waiters get its error, or run it again if it was
        cancelled (its caller gave up). Asked in the failed run's own task."""
        future = self._running.pop(key, None)
        if future is None:
            return
        if not is_handler_error(exc):  # cancelled, or the process is going down
            future.cancel()
        else:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters re-raise it, nobody else needs to

    async def _in_cluster(self, message: Message, inner: Pipeline) -> Any:
        records, take, holder = (
            self._records,
            self._take,
            f"{self._holder}:{next(self._runs)}",
        )  # this run's own claim
        assert records is not None and take is not None
        key = f"idempotency:{message.type_name}:{message.message_id}"
        adapter = self._adapters.get(type(message), _UNKNOWN)
        if adapter is _UNKNOWN:
            adapter = self._adapters[type(message)] = (
                type(message).result_adapter() if isinstance(message, Request) else None
            )
        while (taken := await take(key, holder, self._lease)) is False:  # noqa: ASYNC110 (a broker's record)
            await asyncio.sleep(0.05)  # another node runs it now: wait for its record, or its lease
        if taken is not True:  # a run of this id ended already, here or on another node
            return None if adapter is None else adapter.validator.validate_json(taken)
        try:
            result = await inner(message)
            encoded = b"null" if adapter is None else adapter.serializer.to_json(result, by_alias=True)
        except BaseException:  # the handler's error, or a result no JSON can hold: none is recorded
            with contextlib.suppress(Exception):
                await asyncio.shield(records.release(key, holder))
            raise
        await records.commit(key, holder, encoded, self._window)
        return result

    def _sweep(self, now: float) -> None:
        """Drop the oldest entries past the window (in start order, roughly: stop at a fresh one)."""
        done, window = self._done, self._window
        while done:
            key = next(iter(done))
            if now - done[key][0] <= window:
                break
            done.popitem(last=False)
        self._sweep_at = now + window / 8
