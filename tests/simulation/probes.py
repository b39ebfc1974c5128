"""What the world hooks into each node to see what it does: a pipeline behavior that notes every
handler run, and a transport wrapper that notes each delivery's deadline and each error reply."""

from __future__ import annotations

import asyncio
import json
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from fastapi_catga import CallNext, CatgaError, Message
from fastapi_catga.core.envelope import MESSAGE_ID, NODE, STATUS, Envelope, deadline_of
from fastapi_catga.transports.base import (
    ConnectionListener,
    Delivery,
    DeliveryCallback,
    MembershipStore,
    Subscription,
)
from fastapi_catga.transports.durable import DurableStore
from fastapi_catga.transports.memory import InMemoryTransport
from tests.simulation import messages
from tests.virtual_time import EPOCH

if TYPE_CHECKING:
    from tests.simulation.world import World

__all__ = ["Recorder", "SimTransport", "attempt_deadline"]

#: The loop-time deadline of the attempt that delivered the running handler; None when the handler
#: runs in its caller's task (a local attempt). Set by `SimTransport` around each delivery, so the
#: responder's task for it inherits the value.
attempt_deadline: ContextVar[float | None] = ContextVar("sim_attempt_deadline", default=None)


class Recorder:
    """A pipeline behavior: notes each handler run in the ledger and tells handlers their node."""

    def __init__(self, world: World, node: str) -> None:
        self._world = world
        self._node = node

    async def __call__(self, message: Message, call_next: CallNext) -> Any:
        world = self._world
        run = world.start_run(self._node, message)
        task = asyncio.current_task()
        running = world.nodes[self._node].running
        if task is not None:
            running[task] = None
        token = messages.running_on.set(self._node)
        try:
            result = await call_next()
        except asyncio.CancelledError:
            world.end_run(run, "cancelled")
            raise
        except Exception as exc:
            world.end_run(run, f"raised {type(exc).__name__}")
            raise
        finally:
            messages.running_on.reset(token)
            if task is not None:
                running.pop(task, None)
        world.end_run(run, "ok")
        return result


class SimTransport:
    """An `InMemoryTransport` that tells the ledger what passes through it.

    Deliveries carry their attempt's deadline into `attempt_deadline`; error replies from handlers
    are receipts; transport failures of an attempt disturb the routing calm (they make a node suspect).
    """

    name = "memory"
    supports_queue_groups = True
    bad_frames = 0

    def __init__(self, world: World, inner: InMemoryTransport) -> None:
        self._world = world
        self.inner = inner
        self.max_payload = inner.max_payload

    @property
    def connected(self) -> bool:
        return self.inner.connected

    @property
    def durable(self) -> DurableStore:
        return self.inner.durable

    @property
    def members(self) -> MembershipStore:
        return self.inner.members

    def add_connection_listener(self, listener: ConnectionListener) -> None:
        self.inner.add_connection_listener(listener)

    async def connect(self) -> None:
        await self.inner.connect()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def subscribe(
        self, subject: str, callback: DeliveryCallback, *, queue: str | None = None
    ) -> Subscription:
        def tagged(delivery: Delivery) -> None:
            deadline = deadline_of(delivery.envelope)
            token = attempt_deadline.set(None if deadline is None else deadline - EPOCH)
            try:
                callback(delivery)
            finally:
                attempt_deadline.reset(token)

        return await self.inner.subscribe(subject, tagged, queue=queue)

    async def publish(self, subject: str, envelope: Envelope) -> int:
        return await self.inner.publish(subject, envelope)

    async def request(self, subject: str, envelope: Envelope, *, timeout: float) -> Envelope:
        try:
            reply = await self.inner.request(subject, envelope, timeout=timeout)
        except CatgaError as exc:
            self._world.disturb(f"attempt on {subject} failed: {type(exc).__name__}")
            raise
        if reply.headers.get(STATUS) == "error" and _error_code(reply) in messages.OWN_ERROR_CODES:
            self._world.receive_error(envelope.headers.get(MESSAGE_ID, "?"), reply.headers.get(NODE, "?"))
        return reply


def _error_code(reply: Envelope) -> str | None:
    try:
        body = json.loads(reply.body)
    except ValueError:
        return None
    code = body.get("code") if isinstance(body, dict) else None
    return code if isinstance(code, str) else None
