"""The random workload: which call each step makes, from which node, with what handler behaviour."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable
from typing import Any

from fastapi_catga import CatgaError, Message
from tests.simulation.messages import MODES, Job, Lookup, Mode, Noted
from tests.simulation.world import REQUEST_TIMEOUT, Call, SimNode, World

__all__ = ["Workload"]

KEYS = tuple(f"k{i}" for i in range(6))
TIMEOUTS = (None, None, 0.5, 1.0, 2.0, 5.0)  # None: the node's request timeout
KINDS = ("send", "send", "send", "keyed", "keyed", "send_to_node", "broadcast", "publish")
MODE_WEIGHTS = (10, 1, 1, 1, 1, 1)  # in the order of MODES: mostly ok, each error now and then


class Workload:
    """Starts one call per `step`, in the background; each call records how it ended."""

    def __init__(self, world: World, rng: random.Random) -> None:
        self._world = world
        self._rng = rng
        self._count = 0

    def message_id(self) -> str:
        self._count += 1
        return f"m{self._count}-{self._rng.getrandbits(32):08x}"

    def step(self) -> None:
        rng, world = self._rng, self._world
        callers = [node for node in world.live() if not node.paused]
        stopped = [node for node in world.nodes.values() if node.state == "stopped"]
        if stopped and rng.random() < 0.03:
            callers = stopped  # an app that keeps sending after its node stopped
        if not callers:
            return
        origin = rng.choice(callers)
        kind = rng.choice(KINDS)
        timeout = rng.choice(TIMEOUTS)
        if kind == "publish":
            self._publish(origin)
        elif kind == "keyed":
            self._send(origin, Lookup(key=rng.choice(KEYS), message_id=self.message_id()), timeout)
        elif kind == "send_to_node":
            names = [*world.nodes, "ghost"]
            self._send(origin, self._job(), timeout, target=rng.choice(names))
        elif kind == "broadcast":
            self._broadcast(origin, self._job(), timeout)
        else:
            self._send(origin, self._job(), timeout)

    def _job(self) -> Job:
        rng = self._rng
        mode: Mode = rng.choices(MODES, MODE_WEIGHTS)[0]
        roll = rng.random()
        delay = 0.0 if roll < 0.6 else rng.uniform(0, 0.5) if roll < 0.85 else rng.uniform(0.5, 5.0)
        return Job(mode=mode, delay=round(delay, 3), message_id=self.message_id())

    def _call(self, kind: str, origin: SimNode, message: Message, timeout: float | None) -> Call:
        world = self._world
        budget = REQUEST_TIMEOUT if timeout is None else timeout
        return Call(len(world.calls), kind, origin.name, message, world.now, world.now + budget, timeout)

    def _send(
        self, origin: SimNode, message: Job | Lookup, timeout: float | None, target: str | None = None
    ) -> None:
        mediator = origin.catga.mediator
        call = self._call("send" if target is None else "send_to_node", origin, message, timeout)
        call.target = target
        if isinstance(message, Lookup) and origin.state == "live" and self._world.routing_calm():
            call.window = self._world.window
        if target is None:
            self._start(call, mediator.send(message, timeout=timeout))
        else:
            self._start(call, mediator.send_to_node(message, target, timeout=timeout))

    def _broadcast(self, origin: SimNode, message: Job, timeout: float | None) -> None:
        call = self._call("broadcast", origin, message, timeout)
        self._start(call, origin.catga.mediator.broadcast(message, timeout=timeout))

    def _publish(self, origin: SimNode) -> None:
        event = Noted(fail=self._rng.random() < 0.2, message_id=self.message_id())
        self._start(self._call("publish", origin, event, None), origin.catga.mediator.publish(event))

    def _start(self, call: Call, operation: Awaitable[Any]) -> None:
        self._world.add_call(call)
        call.task = self._world.spawn(_perform(self._world, call, operation), name=f"sim-call-{call.index}")


async def _perform(world: World, call: Call, operation: Awaitable[Any]) -> None:
    try:
        value = await operation
    except CatgaError as exc:
        world.end_call(call, f"error {type(exc).__name__}")
    except asyncio.CancelledError:
        world.end_call(call, "killed" if call.killed else "BAD cancelled")
    except Exception as exc:
        world.end_call(call, f"BAD {type(exc).__name__}: {exc}")
    else:
        world.end_call(call, "ok", value)
