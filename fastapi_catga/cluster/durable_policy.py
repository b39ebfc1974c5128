"""Durable delivery's policy and names: a type's options filled from settings, the group of a
command queue, where outcomes go, and reading what a stored envelope says about itself."""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi_catga.cluster.responder import node_subject
from fastapi_catga.core.dispatch import LocalDispatcher
from fastapi_catga.core.envelope import (
    HEADROOM,
    MESSAGE_ID,
    NODE,
    PER_REPLY,
    REPLAYS,
    STATUS,
    Envelope,
    check_size,
    refuse_non_finite,
)
from fastapi_catga.core.messages import Durable, Message, Request, new_message_id
from fastapi_catga.core.observe import Observer
from fastapi_catga.core.pipeline import Pipeline
from fastapi_catga.core.raised import is_handler_error
from fastapi_catga.exceptions import CatgaError
from fastapi_catga.settings import CatgaSettings
from fastapi_catga.transports.durable import DeadLetter, DurableDelivery, Queue

__all__ = [
    "COMMANDS",
    "DurablePolicy",
    "dead_letter_for",
    "event_runner",
    "message_id_of",
    "observed_run",
    "policy_for",
    "REPLAY_LEASE",
    "replay_claim",
    "replays_of",
    "result_encoder",
    "result_subject",
]

COMMANDS = "workers"  # the one consumer group of a command queue
REPLAY_LEASE = 30.0  # s a replay holds its letter, from before it queues the message to its removal


def replay_claim(letter_id: str) -> str:
    """The claim a replay of ``letter_id`` holds: against another replay of it, and against a node
    replacing the letter with a newer failure before the replay has removed it."""
    return f"replay:{letter_id}"


@dataclass(frozen=True, slots=True)
class DurablePolicy:
    """A durable type's options, its `Durable` fields filled from ``CATGA_DURABLE_*``."""

    attempts: int
    backoff: tuple[float, ...]
    lease: float
    dedup_window: float

    def delay(self, deliveries: int) -> float:
        """The pause after a failed delivery (1-based), jittered by up to 20 %."""
        base = self.backoff[min(deliveries, len(self.backoff)) - 1]
        return base * random.uniform(0.8, 1.0)


def policy_for(message_type: type[Message], settings: CatgaSettings) -> DurablePolicy | None:
    """The type's durable policy, or None when it is not durable."""
    durable = message_type.durable
    if durable is False:
        return None
    options = durable if isinstance(durable, Durable) else Durable()
    return DurablePolicy(
        attempts=options.attempts or settings.durable_attempts,
        backoff=options.backoff or tuple(settings.durable_backoff),
        lease=options.lease or settings.durable_lease,
        dedup_window=options.dedup_window or settings.durable_dedup_window,
    )


def result_subject(node_id: str) -> str:
    """Where a node hears the outcome of the durable commands it waits for."""
    return f"{node_subject(node_id)}.durable-results"


def dead_letter_for(
    queue: Queue, delivery: DurableDelivery, reason: Any, error: CatgaError, message_id: str, node_id: str
) -> DeadLetter:
    """The dead letter of a delivery: why, the error, how often the broker delivered it, where, when."""
    return DeadLetter(
        id=f"{queue.group}:{message_id}",
        queue_kind=queue.kind,
        message_type=queue.type_name,
        message_id=message_id,
        group=queue.group,
        reason=reason,
        error_type=getattr(error, "error_type", type(error).__name__),
        error=_text(error)[:1024],
        attempts=delivery.deliveries,
        node_id=node_id,
        at=datetime.now(UTC),
        replays=replays_of(delivery.envelope),
    )


def _text(error: CatgaError) -> str:
    """The error's message; its class name if it has none that can be read (a subclass that
    skipped ``CatgaError.__init__``)."""
    try:
        return str(error.message)
    except Exception:
        return type(error).__name__


def result_encoder(node_id: str, max_payload: int) -> Callable[[Message, Any], bytes]:
    """How a durable command's result is written, as a reply is (`envelope.encode_result`).

    Raises (the encoder):
        MessageTooLargeError: its reply would be over ``max_payload``, as a plain send's would.
        ValueError: it is no JSON.
    """

    def encode(message: Message, result: Any) -> bytes:
        assert isinstance(message, Request)
        refuse_non_finite(result)
        body = type(message).result_adapter().dump_json(result, by_alias=True)
        if len(body) + HEADROOM > max_payload:
            check_size(Envelope({STATUS: "ok", NODE: node_id}, body), max_payload, "the result", PER_REPLY)
        return body

    return encode


def event_runner(dispatcher: LocalDispatcher, pipeline: Pipeline) -> Callable[[Message], Awaitable[Any]]:
    async def run(event: Message) -> None:
        try:
            await pipeline(event)
        except BaseException as exc:
            if not is_handler_error(exc):
                raise
            raise dispatcher.handler_error(exc, event) from exc

    return run


async def observed_run(
    observer: Observer | None,
    message: Message,
    headers: Mapping[str, str],
    run: Callable[[Message], Awaitable[Any]],
    encode: Callable[[Message, Any], bytes],
) -> bytes:
    """Run a durable handler and encode its result; the observer (if any) is told of one handler
    run, with the stored envelope's headers (its sender's trace context)."""
    if observer is None:
        return encode(message, await run(message))
    token = observer.handle_started(message, headers)
    started, error = time.perf_counter(), None
    try:
        return encode(message, await run(message))
    except BaseException as exc:
        error = exc
        raise
    finally:
        observer.handle_ended(token, message, time.perf_counter() - started, error)


def replays_of(envelope: Envelope) -> int:
    value = envelope.headers.get(REPLAYS)
    return int(value) if type(value) is str and value.isdigit() and len(value) < 9 else 0


def message_id_of(envelope: Envelope) -> str:
    """The id a delivery's envelope names; one of its own for an envelope that names none (each
    unreadable message gets a dead letter, not the first one alone)."""
    value = envelope.headers.get(MESSAGE_ID)
    return value[:200] if type(value) is str and value else f"unknown-{new_message_id()}"
