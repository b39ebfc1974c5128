"""One simulation run: start a cluster, interleave workload and faults, check after every step.

A run has three parts, all on the virtual clock:

1. ``steps`` steps; each starts one call or injects one fault (faults come in storms separated by
   calm stretches), lets a little virtual time pass, and checks the invariants;
2. the faults stop: everything is undone (thaw, restore, resume), joins and leaves finish, and the
   workload goes on for TTL + 1 s, after which every view must be the live set;
3. the calls end, every node stops, and no task may be left.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, get_args

from fastapi_catga.cluster.routing import RoutingName
from tests.simulation.faults import Faults
from tests.simulation.invariants import NO_TASK_LEFT, VIEWS_CONVERGE, Invariants, Violation
from tests.simulation.workload import Workload
from tests.simulation.world import DRAIN_TIMEOUT, TTL, World
from tests.virtual_time import run_virtual

__all__ = ["Options", "Report", "simulate"]

MEAN_STEP = 0.15  # s of virtual time between steps, on average
STORM_FAULT_RATE = 0.25  # chance that a step in a storm injects a fault rather than a call
SETTLE_LIMIT = 30.0  # s: joins and leaves still going after the faults stop must end within this
STOP_LIMIT = 2.0 + DRAIN_TIMEOUT + 1.0  # s: deregister (2 s at most), drain, close


@dataclass(frozen=True, slots=True)
class Options:
    seed: int
    steps: int = 300
    keep_going: bool = False  # go on after a violation (to collect every kind of violation)

    def replay(self) -> str:
        """The command that runs exactly this simulation again."""
        python = os.path.relpath(sys.executable)
        if python.startswith(".."):
            python = "python"
        command = f"{python} -m tests.simulation --seed {self.seed} --steps {self.steps}"
        return command + (" --keep-going" if self.keep_going else "")


@dataclass(slots=True)
class Report:
    options: Options
    routing: str = ""
    digest: str = ""
    violations: list[Violation] = field(default_factory=list)
    nodes: int = 0
    calls: int = 0
    runs: int = 0
    virtual_seconds: float = 0.0
    wall_seconds: float = 0.0
    trace: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        head = (
            f"seed {self.options.seed}: {self.options.steps} steps, routing {self.routing}, "
            f"{self.nodes} nodes, {self.calls} calls, {self.runs} handler runs, "
            f"{self.virtual_seconds:.1f} s virtual in {self.wall_seconds:.2f} s, trace {self.digest}"
        )
        if self.ok:
            return head + ": ok"
        lines = [head + f": {len(self.violations)} violation(s)", *(f"  {v}" for v in self.violations)]
        return "\n".join([*lines, f"replay: {self.options.replay()}"])


def simulate(options: Options) -> Report:
    """Run one seeded simulation on a fresh virtual-time loop."""
    state = random.getstate()
    random.seed(f"fastapi_catga:{options.seed}")  # the library's own jitter and random routing
    started = time.perf_counter()
    try:
        report = run_virtual(_simulate(options))
    finally:
        random.setstate(state)
    report.wall_seconds = time.perf_counter() - started
    return report


class _Stop(Exception):
    """A violation was found and the run is not to keep going."""


class _Run:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.rng = random.Random(options.seed)
        routings: tuple[RoutingName, ...] = get_args(RoutingName)
        self.world = World(self.rng.choice(routings))
        self.faults = Faults(self.world, self.rng)
        self.workload = Workload(self.world, self.rng)
        self.checks = Invariants(self.world)
        self.report = Report(options, routing=self.world.routing)

    def found(self, violations: list[Violation]) -> None:
        self.report.violations += violations
        for violation in violations:
            self.world.note(f"VIOLATION {violation}")
        if violations and not self.options.keep_going:
            raise _Stop

    async def tick(self) -> None:
        await asyncio.sleep(round(min(1.0, self.rng.expovariate(1 / MEAN_STEP)), 4))
        self.found(self.checks.after_step())

    async def main(self) -> None:
        world = self.world
        for _ in range(self.rng.randint(3, 5)):
            node = world.add_node(self.faults.next_name())
            await node.catga.start()
            node.state = "live"
        storm, phase_end = False, 0
        for step in range(self.options.steps):
            world.step = step
            if step >= phase_end:
                storm, phase_end = not storm, step + self.rng.randint(20, 60)
            self.faults.undo_due()
            if storm and self.rng.random() < STORM_FAULT_RATE:
                self.faults.step()
            else:
                self.workload.step()
            await self.tick()
        world.step = self.options.steps
        world.note("faults stop")
        self.faults.end_all()
        await self.settle()
        quiet_until = world.last_fault + TTL + 1.0
        while world.now < quiet_until:
            self.workload.step()
            await self.tick()
        self.found(self.checks.after_step())  # the views, TTL + 1 s after the faults stopped
        await self.finish()

    async def settle(self) -> None:
        """Let joins and leaves caught in the faults end."""
        world = self.world
        limit = world.now + SETTLE_LIMIT
        while any(task.get_name().startswith(("sim-join", "sim-leave")) for task in world.tasks):
            if world.now > limit:
                stuck = [
                    t.get_name() for t in world.tasks if t.get_name().startswith(("sim-join", "sim-leave"))
                ]
                self.found([self.checks.violation(VIEWS_CONVERGE, f"still joining or leaving: {stuck}")])
                return
            await self.tick()

    async def finish(self) -> None:
        """Wait for the calls, stop every node, and look for tasks left behind."""
        world = self.world
        last_deadline = max((call.deadline for call in world.calls), default=world.now)
        while world.tasks and world.now <= last_deadline + 0.1:
            await asyncio.sleep(0.05)
            self.found(self.checks.after_step())
        world.note("stopping every node")
        for node in world.nodes.values():
            if node.state == "stopped":
                continue
            try:
                async with asyncio.timeout(STOP_LIMIT):
                    await node.catga.stop()
            except TimeoutError:
                self.found([self.checks.violation(NO_TASK_LEFT, f"{node.name} ({node.state}): stop() hung")])
            node.state = "stopped"
        for task in world.tasks:  # calls still going were reported at their deadline
            task.cancel()
        for _ in range(10):  # cancelled tasks need a turn of the loop to finish
            await asyncio.sleep(0)
        current = asyncio.current_task()
        left = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
        if left:
            names = sorted(_describe_task(task) for task in left)
            self.found([self.checks.violation(NO_TASK_LEFT, f"{len(left)} task(s) left: {', '.join(names)}")])


def _describe_task(task: asyncio.Task[Any]) -> str:
    """The task's name and coroutine, and the node it belongs to when its ``self`` says."""
    coro = task.get_coro()
    frame = getattr(coro, "cr_frame", None)
    owner = getattr(frame, "f_locals", {}).get("self")
    node = getattr(owner, "node_id", None)
    where = f" of {node}" if isinstance(node, str) else ""
    return f"{task.get_name()} ({getattr(coro, '__qualname__', '?')}{where})"


async def _simulate(options: Options) -> Report:
    run = _Run(options)
    with contextlib.suppress(_Stop):
        await run.main()
    world, report = run.world, run.report
    report.digest = world.digest()
    report.nodes, report.calls, report.runs = len(world.nodes), len(world.calls), len(world.runs)
    report.virtual_seconds = world.now
    report.trace = list(world.trace)  # what the teardown adds (cancelling leftovers) is no part of it
    return report
