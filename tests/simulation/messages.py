"""What the simulated nodes run. Each message carries what its handler will do, so a handler's
behaviour comes from the seed that made the message, and every node does the same with it."""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Literal

from fastapi_catga import (
    CatgaError,
    Command,
    Event,
    Query,
    RemoteHandlerError,
    RequestTimeoutError,
    RetryableError,
    TransportError,
    handler,
)

Mode = Literal["ok", "error", "transport", "timeout", "user", "retryable"]
MODES: tuple[Mode, ...] = ("ok", "error", "transport", "timeout", "user", "retryable")

#: The node a handler runs on; the world's recording behavior sets it around every run.
running_on: ContextVar[str] = ContextVar("sim_running_on", default="?")


class Refused(CatgaError):
    """A user's own error class (the caller's process defines it too)."""

    code = "sim_refused"


#: Modes in which the handler raises an error of its own: it must run once, not be retried.
OWN_ERRORS: frozenset[str] = frozenset({"error", "transport", "timeout", "user"})
#: The wire codes of those errors, as their replies carry them.
OWN_ERROR_CODES = frozenset(
    {RemoteHandlerError.code, TransportError.code, RequestTimeoutError.code, Refused.code}
)


class Job(Command[str]):
    """Sleeps ``delay`` seconds, then returns the node's name or raises what ``mode`` says."""

    mode: Mode = "ok"
    delay: float = 0.0


class Lookup(Query[str]):
    """A quick query routed by its key; returns the node's name."""

    key: str

    def routing_key(self) -> str:
        return self.key


class Noted(Event):
    """An event; its handler raises when ``fail`` is set (logged, never retried)."""

    fail: bool = False


@handler
async def run_job(job: Job) -> str:
    if job.delay:
        await asyncio.sleep(job.delay)
    node = running_on.get()
    where = f"{job.message_id} on {node}"
    if job.mode == "error":
        raise RuntimeError(f"job {where} failed")
    if job.mode == "transport":
        raise TransportError(f"job {where}: its own downstream call lost the connection")
    if job.mode == "timeout":
        raise RequestTimeoutError(f"job {where}: its own downstream call timed out")
    if job.mode == "user":
        raise Refused(f"job {where} refused")
    if job.mode == "retryable":
        raise RetryableError(f"job {where}: busy, try elsewhere")
    return node


@handler
async def look_up(query: Lookup) -> str:
    return running_on.get()


@handler
async def on_noted(event: Noted) -> None:
    if event.fail:
        raise RuntimeError(f"event {event.message_id} handler failed on {running_on.get()}")
