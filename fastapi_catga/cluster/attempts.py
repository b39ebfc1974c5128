"""One attempt of a send on one target, over the broker or in this process, and the bookkeeping
of a call across its attempts (`Call`, `final_error`).

What this attempt's transport did (nobody listening, the attempt's deadline, a lost connection, a
node without the handler, a node with no handler slot free) is raised as `AttemptFailed`; what the
handler raised is raised as it is, `BusyError` included: a node's own "busy" reply is marked
``catga-origin: node``, a handler's is not.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi_catga.cluster.limits import HandlerLimits
from fastapi_catga.cluster.responder import node_subject, type_subject
from fastapi_catga.core.dispatch import LocalDispatcher
from fastapi_catga.core.envelope import (
    ATTEMPT,
    DEADLINE,
    STATUS,
    Envelope,
    deadline_header,
    decode_reply,
    encode_message,
    error_from_reply,
    made_by_node,
)
from fastapi_catga.core.messages import Request
from fastapi_catga.core.observe import Observer
from fastapi_catga.core.travels import as_received, result_check
from fastapi_catga.exceptions import (
    BusyError,
    CatgaError,
    HandlerNotFoundError,
    MessageTooLargeError,
    MessageValidationError,
    NodeUnavailableError,
    NoResponderError,
    RequestTimeoutError,
    TransportError,
)
from fastapi_catga.transports.base import Transport

__all__ = ["AttemptFailed", "Attempts", "Call", "final_error"]


class AttemptFailed(Exception):
    """This attempt's transport failed, not the handler: ``error`` is what it amounts to."""

    def __init__(self, error: CatgaError) -> None:
        super().__init__(error.message)
        self.error = error


class Call:
    """One ``send``: the message, its deadline, what went wrong so far, its envelope once encoded."""

    __slots__ = ("_envelope", "budget", "deadline", "errors", "last_target", "message")

    def __init__(self, message: Request[Any], deadline: float, budget: float) -> None:
        self.message = message
        self.deadline = deadline
        self.budget = budget
        self.errors: list[CatgaError] = []
        self.last_target = ""
        self._envelope: Envelope | None = None

    def envelope(self, source: str, max_payload: int) -> Envelope:
        if self._envelope is None:
            self._envelope = encode_message(self.message, source=source, max_payload=max_payload)
        return self._envelope


def final_error(call: Call, now: float) -> CatgaError:
    """What a call that ran out of attempts (or time) raises, from what went wrong on the way."""
    what = f"{call.message.type_name} {call.message.message_id}"
    last = call.errors[-1] if call.errors else None
    if last is None:
        if now >= call.deadline:
            return RequestTimeoutError(f"{what}: no answer within {call.budget:g} s")
        return HandlerNotFoundError(f"no live node handles {call.message.type_name}")
    if isinstance(last, NoResponderError) and not last.node_id and len(call.errors) == 1:
        return HandlerNotFoundError(f"no live node handles {call.message.type_name}")  # as without a try
    if type(last) is TransportError:
        return last  # the broker stayed unreachable until the deadline
    if isinstance(last, RequestTimeoutError) or now >= call.deadline:
        error: CatgaError = RequestTimeoutError(
            f"{what}: no answer within {call.budget:g} s ({len(call.errors)} attempt(s))"
        )
    elif isinstance(last, BusyError | NoResponderError | HandlerNotFoundError):
        # Nobody could take it: "busy" if any node said so (come back later), else nobody is there.
        if any(isinstance(error, BusyError) for error in call.errors):
            error = BusyError(f"{what}: every node tried is busy or gone ({len(call.errors)} attempt(s))")
        else:
            error = NodeUnavailableError(
                f"{what}: no live node could take it ({len(call.errors)} attempt(s))"
            )
    else:
        return last  # a handler's retryable error, or a node's "stopped mid-run", after the last attempt
    error.__cause__ = last
    return error


class Attempts:
    """Runs one attempt of a call: over the broker to another node, or here through the dispatcher."""

    def __init__(
        self,
        transport: Transport,
        dispatcher: LocalDispatcher,
        node_id: str,
        clocks: tuple[Callable[[], float], Callable[[], float]],
        observer: Observer | None,
        limits: HandlerLimits,
    ) -> None:
        """``clocks``: the monotonic one of a `Call`'s deadline, and UNIX time for deadlines that travel."""
        self._limits = limits
        self._transport = transport
        self._dispatcher = dispatcher
        self._node_id = node_id
        self._clock, self._wall_clock = clocks
        self._checks: dict[type[Request[Any]], Callable[[Request[Any], Any], Any]] = {}
        self._observer = observer

    async def run(self, call: Call, target: str, attempt: int, timeout: float) -> Any:
        """The result of one attempt on ``target`` ("" lets the broker's queue group pick)."""
        if target == self._node_id:
            return await self._here(call, timeout)
        envelope = call.envelope(self._node_id, self._transport.max_payload)
        headers = {
            **envelope.headers,
            ATTEMPT: str(attempt),
            DEADLINE: deadline_header(self._wall_clock() + timeout),
        }
        if self._observer is not None:
            self._observer.inject(headers)
        subject = node_subject(target) if target else type_subject(call.message.type_name)
        try:
            reply = await self._transport.request(subject, Envelope(headers, envelope.body), timeout=timeout)
        except MessageTooLargeError:
            raise  # the same on every node: no other attempt can do better
        except CatgaError as exc:
            exc.node_id = target or None
            raise AttemptFailed(exc) from None
        if reply.headers.get(STATUS) == "error" and made_by_node(reply):
            error = error_from_reply(reply)
            # An out-of-date record; no slot free; a node that stopped mid-run (it may have run in part,
            # as a node that died would have: the same retry, without waiting out the deadline).
            if isinstance(error, HandlerNotFoundError | BusyError | NodeUnavailableError):
                raise AttemptFailed(error)
            raise error
        return decode_reply(reply, type(call.message).result_adapter())

    async def _here(self, call: Call, timeout: float) -> Any:
        """The attempt on this node: its message and result held to what travels (a run that works
        here works on another node, and the other way round)."""
        limits = self._limits
        envelope = call.envelope(self._node_id, self._transport.max_payload)  # the payload limit, once
        try:
            message = as_received(call.message, envelope.body, self._dispatcher.types)
        except MessageValidationError as exc:
            exc.node_id = self._node_id  # the node that could not read it, as another node names itself
            raise
        if not limits.enter(message.type_name):
            raise AttemptFailed(limits.refused(message.type_name))  # like another node's "busy"
        try:  # at once: whatever raises from here on (an observer's hook too) gives the slot back
            if self._observer is None:
                ran = await self._dispatcher.handle_request(message, timeout, keep_late=True)
                result = self._travels(message, ran)
            else:
                result = await self._observed_here(self._observer, message, timeout)
        except TimeoutError as exc:
            if isinstance(exc, CatgaError):
                raise  # a handler's own RequestTimeoutError
            error = RequestTimeoutError(f"{message.type_name} ran over {timeout:.3f} s here")
            raise AttemptFailed(error) from None
        finally:
            limits.leave(message.type_name)
        # Past its share, its caller (this task) still waits: kept. Past the whole deadline, a caller
        # on another node has given up: the same here.
        if self._clock() > call.deadline:  # an attempt that ran out of time, as one elsewhere does
            raise AttemptFailed(RequestTimeoutError(f"{message.type_name} ran past its deadline here"))
        return result

    async def _observed_here(self, observer: Observer, message: Request[Any], timeout: float) -> Any:
        token = observer.handle_started(message, {})
        started = time.perf_counter()
        try:
            ran = await self._dispatcher.handle_request(message, timeout, keep_late=True)
            result = self._travels(message, ran)
        except BaseException as exc:
            observer.handle_ended(token, message, time.perf_counter() - started, exc)
            raise
        observer.handle_ended(token, message, time.perf_counter() - started, None)
        return result

    def _travels(self, message: Request[Any], result: Any) -> Any:
        """``result`` as a reply would bring it (`result_check`, made once per type)."""
        check = self._checks.get(type(message))
        if check is None:
            adapter, max_payload = type(message).result_adapter(), self._transport.max_payload
            check = self._checks[type(message)] = result_check(
                adapter, node_id=self._node_id, max_payload=max_payload
            )
        return check(message, result)
