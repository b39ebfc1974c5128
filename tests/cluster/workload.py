"""Messages and handlers the cluster tests run; each records which node ran it."""

from __future__ import annotations

import asyncio
import contextvars
from collections import Counter

from fastapi_catga import Command, Event, Query, RetryableError, handler

#: Set per node by the tests' behavior below, so handlers can say where they ran.
current_node: contextvars.ContextVar[str] = contextvars.ContextVar("current_node", default="?")
executions: Counter[tuple[str, str]] = Counter()  # (node, message_id) -> runs
events_seen: list[tuple[str, str]] = []  # (node, event id)


class Work(Command[str]):
    """Returns the id of the node that ran it, after ``delay`` seconds."""

    delay: float = 0.0


class Sticky(Query[str]):
    key: str

    def routing_key(self) -> str:
        return self.key


class Flaky(Command[str]):
    pass


class Nobody(Query[int]):
    """No node handles this."""


class Happened(Event):
    what: str = ""


@handler
async def work(command: Work) -> str:
    node = current_node.get()
    executions[(node, command.message_id)] += 1
    if command.delay:
        await asyncio.sleep(command.delay)
    return node


@handler
async def sticky(query: Sticky) -> str:
    return current_node.get()


@handler
async def flaky(command: Flaky) -> str:
    raise RetryableError(f"node {current_node.get()} is busy")


@handler
async def on_happened(event: Happened) -> None:
    events_seen.append((current_node.get(), event.message_id))


@handler
async def on_happened_too(event: Happened) -> None:
    events_seen.append((current_node.get() + "/2", event.message_id))
