"""The random faults: crash, pause, broker outage, frozen broker, join, graceful leave.

Faults with a duration (pause, outage, freeze) are undone by the agenda at the first step after
their time is up; `end_all` undoes whatever is still going when the run stops injecting faults.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from fastapi_catga import CatgaError
from tests.simulation.world import SimNode, World

__all__ = ["MAX_NODES", "Faults"]

MAX_NODES = 7  # live or starting at once
KINDS = ("crash", "pause", "pause", "outage", "freeze", "freeze", "join", "join", "leave")


class Faults:
    def __init__(self, world: World, rng: random.Random) -> None:
        self._world = world
        self._rng = rng
        self._agenda: list[tuple[float, int, str, Callable[[], None]]] = []
        self._names = 0
        self._undos = 0

    def next_name(self) -> str:
        self._names += 1
        return f"n{self._names}"

    def step(self) -> None:
        """Inject one random fault (or none, when the one drawn cannot happen now)."""
        kind = self._rng.choice(KINDS)
        getattr(self, f"_{kind}")()

    def undo_due(self) -> None:
        now = self._world.now
        while self._agenda and self._agenda[0][0] <= now:
            _, _, what, undo = self._agenda.pop(0)
            undo()
            self._world.fault_changed(what)

    def end_all(self) -> None:
        """Undo every fault still going (thaw, restore, resume), now."""
        for _, _, what, undo in self._agenda:
            undo()
            self._world.fault_changed(what)
        self._agenda.clear()

    def _later(self, seconds: float, what: str, undo: Callable[[], None]) -> None:
        self._undos += 1
        self._agenda.append((self._world.now + seconds, self._undos, what, undo))
        self._agenda.sort(key=lambda entry: entry[:2])

    def _duration(self, longest: float) -> float:
        return round(self._rng.uniform(0.2, longest), 3)

    def _serving(self) -> list[SimNode]:
        return [node for node in self._world.live() if not node.paused]

    # -- the faults ----------------------------------------------------------------------------

    def _crash(self) -> None:
        node = self._rng.choice(self._world.live())
        if not node.paused and len(self._serving()) < 2:
            return  # someone must be left to make calls
        node.transport.crash()
        node.state = "crashed"
        for task in list(node.running):  # kill -9 ends its handlers...
            task.cancel()
        for call in self._world.calls:  # ...and its callers
            if call.origin == node.name and call.ended is None and call.task is not None:
                call.killed = True
                call.task.cancel()
        self._world.fault_changed(f"crash {node.name}")

    def _pause(self) -> None:
        serving = self._serving()
        if len(serving) < 2:
            return
        node = self._rng.choice(serving)
        seconds = self._duration(8.0)
        node.transport.pause()
        node.paused = True
        self._world.fault_changed(f"pause {node.name} for {seconds} s")

        def resume() -> None:
            node.transport.resume()
            node.paused = False

        self._later(seconds, f"resume {node.name}", resume)

    def _outage(self) -> None:
        broker = self._world.broker
        if not broker.up or broker.frozen:
            return
        seconds = self._duration(6.0)
        broker.outage()
        self._world.fault_changed(f"broker outage for {seconds} s")
        self._later(seconds, "broker restored", broker.restore)

    def _freeze(self) -> None:
        broker = self._world.broker
        if not broker.up or broker.frozen:
            return
        seconds = self._duration(8.0)
        broker.freeze()
        self._world.fault_changed(f"broker frozen for {seconds} s")
        self._later(seconds, "broker thawed", broker.thaw)

    def _join(self) -> None:
        world = self._world
        if sum(node.state in ("live", "starting") for node in world.nodes.values()) >= MAX_NODES:
            return
        node = world.add_node(self.next_name())
        world.fault_changed(f"{node.name} joining")
        world.spawn(join(world, node), name=f"sim-join-{node.name}")

    def _leave(self) -> None:
        serving = self._serving()
        if len(serving) < 2:
            return
        node = self._rng.choice(serving)
        node.state = "leaving"
        self._world.fault_changed(f"{node.name} leaving")
        self._world.spawn(leave(self._world, node), name=f"sim-leave-{node.name}")


async def join(world: World, node: SimNode) -> None:
    try:
        await node.catga.start()
    except CatgaError as exc:
        node.state = "failed"
        world.fault_changed(f"{node.name} failed to start: {type(exc).__name__}")
        return
    except Exception as exc:
        node.state = "failed"
        world.oddities.append(f"{node.name}: start() raised {exc!r}, not a CatgaError")
        world.fault_changed(f"{node.name} failed to start: {exc!r}")
        return
    node.state = "live"
    world.fault_changed(f"{node.name} joined")


async def leave(world: World, node: SimNode) -> None:
    try:
        await node.catga.stop()
    except Exception as exc:
        world.oddities.append(f"{node.name}: stop() raised {exc!r}")
    node.state = "stopped"
    world.fault_changed(f"{node.name} left")
