"""The sending side of a node: pick a node, attempt, retry, fail over; broadcast.

The error rule, on every path: an error that describes *this attempt's transport* (nobody
listening, the attempt's deadline, a lost connection, a node without the handler, a node that
answered "busy" itself) may be retried on another node. An error the *handler* raised is the
caller's answer, returned once, unless it is a `RetryableError` (or wraps an exception that says
``retryable = True``). The two kinds are told apart by where they arise, never by their class: a
handler may itself raise `TransportError` or `BusyError`.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi_catga.cluster.attempts import AttemptFailed, Attempts, Call, final_error
from fastapi_catga.cluster.limits import HandlerLimits
from fastapi_catga.cluster.routing import RoutingStrategy, choose_node
from fastapi_catga.cluster.view import ClusterView
from fastapi_catga.core.dispatch import LocalDispatcher
from fastapi_catga.core.envelope import budget_of
from fastapi_catga.core.messages import Request
from fastapi_catga.core.nodes import NodeInfo
from fastapi_catga.core.observe import Observer
from fastapi_catga.exceptions import (
    BusyError,
    CatgaError,
    HandlerNotFoundError,
    MessageValidationError,
    NodeUnavailableError,
    NoResponderError,
    RequestTimeoutError,
    TransportError,
    asks_for_retry,
)
from fastapi_catga.transports.base import Transport

__all__ = ["Sender"]

#: How long past its deadline a broadcast waits for an entry that has not ended (a handler here
#: that ignores its cancellation); the entry is then a timeout, as a silent node's is.
_BROADCAST_GRACE = 1.0


def _discard(entry: asyncio.Future[Any]) -> None:
    if not entry.cancelled():
        entry.exception()  # retrieved: nobody waits for it any more


def _late(call: Call, node_id: str) -> RequestTimeoutError:
    what = f"{call.message.type_name} {call.message.message_id}"
    return RequestTimeoutError(
        f"{what}: no answer within {call.budget:g} s from node {node_id}", node_id=node_id
    )


class Sender:
    """Runs commands and queries on capable nodes, this one included.

    Args:
        transport: the broker connection.
        dispatcher: this node's handlers; a message routed here runs through it.
        view: the live members.
        strategy: how a node is picked among the capable ones (a routing key always hashes).
        request_timeout: the default total deadline of a send, seconds.
        retry_attempts: attempts in all, each on another node where one exists.
        connected: set while the broker connection is up (a send waits for it, within its deadline).
        clock: monotonic seconds; wall_clock: UNIX seconds, for deadlines that travel.
        limits: this node's handler slots (a send routed here takes one, or fails over as "busy").
        observer: told about each send and attempt (None: nothing is called).
    """

    def __init__(
        self,
        transport: Transport,
        dispatcher: LocalDispatcher,
        view: ClusterView,
        *,
        strategy: RoutingStrategy,
        request_timeout: float,
        retry_attempts: int,
        connected: asyncio.Event,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        limits: HandlerLimits,
        observer: Observer | None = None,
    ) -> None:
        self.transport = transport
        self.dispatcher = dispatcher
        self.view = view
        self.request_timeout = request_timeout
        self.closed = False
        self._strategy = strategy
        self._attempts = retry_attempts
        self._connected = connected
        self._clock = clock
        self.observer = observer
        self._attempter = Attempts(transport, dispatcher, view.node_id, (clock, wall_clock), observer, limits)
        self._node_id = view.node_id

    @property
    def node_id(self) -> str:
        return self._node_id

    def budget(self, timeout: float | None) -> float:
        """The deadline of one call, seconds from now; a stopped node takes no more calls.

        Raises:
            NodeUnavailableError: this node was stopped.
            MessageValidationError: ``timeout`` is no positive number of seconds up to `MAX_TIMEOUT`.
        """
        if self.closed:
            raise NodeUnavailableError(f"node {self.node_id} is stopped; it sends nothing more")
        return self.request_timeout if timeout is None else budget_of(timeout)

    def send(
        self, message: Request[Any], *, node_id: str | None = None, timeout: float | None = None
    ) -> Awaitable[Any]:
        """Run a command or query on one capable node, retrying on another within the deadline.

        A plain function that checks its arguments and returns the send to await (one coroutine
        frame less on every send); what it raises, it raises at the call. ``message`` is a
        `Request` (`ClusterNode.send` checks).
        """
        budget = self.budget(timeout)
        self.view.learn(type(message))
        call = Call(message, self._clock() + budget, budget)
        if self.observer is not None:
            return self._observed_send(call, node_id)
        if node_id is not None:
            return self._send_to(call, node_id)
        return self._send_any(call)

    async def _observed_send(self, call: Call, node_id: str | None) -> Any:
        assert self.observer is not None
        observer, message = self.observer, call.message
        token = observer.send_started(message, "send")
        started = time.perf_counter()
        try:
            result = await (self._send_any(call) if node_id is None else self._send_to(call, node_id))
        except BaseException as exc:
            observer.send_ended(token, message, "send", time.perf_counter() - started, exc)
            raise
        observer.send_ended(token, message, "send", time.perf_counter() - started, None)
        return result

    async def _send_to(self, call: Call, node_id: str) -> Any:
        node = self.view.get(node_id)
        if node is None:
            known = ", ".join(n.node_id for n in self.view.nodes())
            raise NodeUnavailableError(f"node {node_id!r} is unknown or dead; live nodes: {known}")
        if call.message.type_name not in node.handles:
            raise HandlerNotFoundError(f"node {node_id} has no handler for {call.message.type_name}")
        if (refused := self.view.incompatible(call.message.type_name, node_id)) is not None:
            raise refused
        if (now := self._clock()) >= call.deadline:  # (a broadcast's, after a loop that stalled)
            raise final_error(call, now)  # nothing sent: its receiver would only drop it, and warn
        try:
            return await self._patient_attempt(call, node_id, 1, math.inf)
        except AttemptFailed as failed:
            if isinstance(failed.error, RequestTimeoutError):  # in the words of every other path
                what = f"{call.message.type_name} {call.message.message_id}"
                raise RequestTimeoutError(
                    f"{what}: no answer within {call.budget:g} s from node {node_id}", node_id=node_id
                ) from None
            if isinstance(failed.error, NoResponderError):
                self.view.suspect(node_id, self._clock())
                raise NodeUnavailableError(
                    f"node {node_id} is not listening (stopped or crashed)", node_id=node_id
                ) from failed.error
            raise failed.error from None

    async def _send_any(self, call: Call) -> Any:
        me, type_name = self._node_id, call.message.type_name
        candidates = self.view.capable(type_name)
        if not candidates and (refused := self.view.incompatible(type_name)) is not None:
            raise refused  # rather than a decode error over there, or a wait for the queue group
        if len(candidates) > 1 or (candidates and candidates[0].node_id != me):
            # The same size rule wherever the router lands: encode now, once, for every attempt.
            call.envelope(me, self.transport.max_payload)
        tried: set[str] = set()
        for attempt in range(1, self._attempts + 1):
            remaining = call.deadline - self._clock()
            if attempt > 1:
                candidates = self.view.capable(type_name)  # the view may have changed while the last one ran
            target = self._pick(call.message, tried, candidates)
            if remaining <= 0 or target is None:
                break
            if call.errors and self.observer is not None:
                self.observer.failover(call.message, call.last_target, call.errors[-1])
            # Each attempt gets its share of the time left, so one dead or paused node cannot eat the
            # whole budget; with no other node left to try, a retry would only run a slow handler
            # again, so the last candidate gets all of it.
            untried = len(candidates) if not tried else self._untried(call.message, tried)
            share = remaining / max(1, min(self._attempts - attempt + 1, untried))
            try:
                return await self._patient_attempt(call, target, attempt, share)
            except AttemptFailed as failed:
                call.errors.append(failed.error)
                if isinstance(failed.error, NoResponderError | RequestTimeoutError | NodeUnavailableError):
                    self.view.suspect(target, self._clock())
            except CatgaError as exc:  # the handler's own answer
                call.errors.append(exc)
                if not asks_for_retry(exc) or self._untried(call.message, tried | {target}) == 0:
                    raise  # returned once; a retryable one only goes on to a node not tried yet
            tried.add(target)
            call.last_target = target
            await self._backoff(call.errors[-1], call.deadline)
        raise final_error(call, self._clock())

    async def _patient_attempt(self, call: Call, target: str, attempt: int, share: float) -> Any:
        """Run an attempt; when the broker connection is down, wait for it (up to the deadline) and
        run it again. No node is to blame for that, so it costs no attempt and marks no suspect."""
        while True:
            try:
                timeout = min(share, call.deadline - self._clock())
                if self.observer is None:
                    return await self._attempter.run(call, target, attempt, timeout)
                return await self._observed_attempt(call, target, attempt, timeout)
            except AttemptFailed as failed:
                if self.closed:  # the node stopped meanwhile: its connection is gone for good
                    raise NodeUnavailableError(
                        f"node {self.node_id} stopped; it sends nothing more"
                    ) from None
                lost = type(failed.error) is TransportError
                if not lost or not await self._broker_back(call.deadline):
                    raise

    async def _observed_attempt(self, call: Call, target: str, attempt: int, timeout: float) -> Any:
        assert self.observer is not None
        observer, message = self.observer, call.message
        token = observer.attempt_started(message, target, attempt)
        try:
            result = await self._attempter.run(call, target, attempt, timeout)
        except AttemptFailed as failed:
            observer.attempt_ended(token, message, target, attempt, failed.error)
            raise
        except BaseException as exc:
            observer.attempt_ended(token, message, target, attempt, exc)
            raise
        observer.attempt_ended(token, message, target, attempt, None)
        return result

    async def _broker_back(self, deadline: float) -> bool:
        # At least a pause (a broker refusing while "connected" must not spin us), never past the deadline.
        await asyncio.sleep(max(0.0, min(0.05, deadline - self._clock())))
        try:
            async with asyncio.timeout(max(0.0, deadline - self._clock())):
                await self._connected.wait()
        except TimeoutError:
            return False
        return not self.closed and self._clock() < deadline - 0.01

    def _pick(self, message: Request[Any], tried: set[str], candidates: list[NodeInfo]) -> str | None:
        if len(candidates) == 1 and not tried:
            return candidates[0].node_id  # what every strategy and routing key would pick
        view = self.view
        if not tried and candidates and not view.is_suspect(candidates[-1].node_id):
            pool = candidates  # the usual first attempt: suspects come last, so there is none
        else:
            fresh = [n for n in candidates if n.node_id not in tried and not view.is_suspect(n.node_id)]
            pool = fresh or [n for n in candidates if n.node_id not in tried] or candidates
        if pool:
            return choose_node(self._strategy, pool, message, self._node_id).node_id
        if self.transport.supports_queue_groups and not tried:
            return ""  # nobody known: let the broker pick from the type's queue group
        return None

    def _untried(self, message: Request[Any], tried: set[str]) -> int:
        return sum(1 for node in self.view.capable(message.type_name) if node.node_id not in tried)

    async def _backoff(self, error: CatgaError, deadline: float) -> None:
        if isinstance(error, NoResponderError | HandlerNotFoundError | BusyError | NodeUnavailableError):
            return  # the broker (or the node, busy or stopping) answered at once: switch now
        delay = min(random.uniform(0.05, 0.2), max(0.0, deadline - self._clock()))
        await asyncio.sleep(delay)

    async def broadcast(self, message: Request[Any], *, timeout: float | None = None) -> dict[str, Any]:
        """Send to every live node at once; one entry per node, a result or a `CatgaError`."""
        if not isinstance(message, Request):
            raise MessageValidationError(
                f"broadcast() takes a Command or Query, not {type(message).__name__}"
            )
        budget = self.budget(timeout)
        self.view.learn(type(message))
        call = Call(message, self._clock() + budget, budget)
        if self.observer is None:
            return await self._broadcast(call)
        token = self.observer.send_started(message, "broadcast")
        started = time.perf_counter()
        try:
            results = await self._broadcast(call)
        except BaseException as exc:
            self.observer.send_ended(token, message, "broadcast", time.perf_counter() - started, exc)
            raise
        self.observer.send_ended(token, message, "broadcast", time.perf_counter() - started, None)
        return results

    async def _broadcast(self, call: Call) -> dict[str, Any]:
        nodes = self.view.nodes()

        async def one(node: NodeInfo) -> Any:
            try:
                return await self._send_to(call, node.node_id)
            except CatgaError as exc:
                return exc

        entries = [asyncio.ensure_future(one(node)) for node in nodes]
        try:  # every entry ends by the deadline: a remote one by its attempt's, a run here cancelled
            # at it; a handler here that ignores its cancellation does not hold the others' answers
            await asyncio.wait(entries, timeout=max(0.0, call.deadline - self._clock()) + _BROADCAST_GRACE)
        except BaseException:  # its caller was cancelled: so is every entry, waited for, as gather()'s
            for entry in entries:
                entry.cancel()
            await asyncio.wait(entries, timeout=_BROADCAST_GRACE)
            raise
        finally:
            for entry in entries:
                if not entry.done():
                    entry.cancel()  # once more: its run here ignored the first
                    entry.add_done_callback(_discard)  # its answer has nobody to go to now
        results: dict[str, Any] = {}
        for node, entry in zip(nodes, entries, strict=True):
            if not entry.done():
                results[node.node_id] = _late(call, node.node_id)
                continue
            error = entry.exception()  # a node's error is its entry; anything else: an exit, a bug
            if error is not None:
                raise error
            results[node.node_id] = entry.result()
        return results
