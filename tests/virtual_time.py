"""An event loop on a virtual clock: timers fire at once, in order, and a minute passes in milliseconds.

Everything fastapi-catga times (sleeps, ``asyncio.timeout``, reapers, membership loops) runs on the
loop's clock, so a whole cluster on the in-memory transport runs deterministically in virtual time::

    def test_expiry() -> None:
        run_virtual(scenario())          # a plain (not async) test

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        node = build(..., clock=loop.time, wall_clock=lambda: EPOCH + loop.time())

Real file descriptors (the loop's self-pipe) are still polled, without waiting, so threads and
``call_soon_threadsafe`` work; when nothing at all is scheduled the loop waits for them for real.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, TypeVar

from fastapi_catga import Catga, CatgaSettings, PipelineBehavior, build
from fastapi_catga.core.handlers import HandlerSource
from fastapi_catga.core.observe import Observer
from fastapi_catga.testing import InMemoryBroker, InMemoryTransport
from fastapi_catga.transports.base import Transport

__all__ = ["EPOCH", "VirtualTimeLoop", "run_virtual", "stall", "virtual_node"]

T = TypeVar("T")

#: The UNIX time a virtual clock starts at (deadlines on the wire are UNIX milliseconds).
EPOCH = 1_800_000_000.0


class _VirtualSelector(selectors.DefaultSelector):
    """Polls real descriptors without waiting, and moves the loop's clock to the next timer instead."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout is None:
            # Nothing scheduled at all: only another thread can wake the loop; wait for it for real.
            return ready or super().select(timeout)
        self.now += max(0.0, timeout)
        return ready


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose ``time()`` is virtual: it jumps to the next timer when idle."""

    def __init__(self) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(selector=self._virtual)

    def time(self) -> float:
        return self._virtual.now


def stall(seconds: float) -> None:
    """Block the running virtual loop for ``seconds``, as a CPU-bound call or a long GC would: the
    clock moves on while no callback runs."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualTimeLoop), "stall() needs a VirtualTimeLoop"
    loop._virtual.now += seconds


def virtual_node(
    broker: InMemoryBroker,
    node_id: str,
    *,
    handlers: Iterable[HandlerSource],
    behaviors: Sequence[PipelineBehavior] = (),
    transport: Transport | None = None,
    observers: Sequence[Observer] = (),
    **settings: Any,
) -> Catga:
    """A node (not started) on ``broker`` (through ``transport`` if given) whose clocks are the
    running virtual loop's."""
    loop = asyncio.get_running_loop()
    return build(
        CatgaSettings(node_id=node_id, **settings),
        handlers=handlers,
        behaviors=behaviors,
        transport=transport or InMemoryTransport(broker),
        observers=observers,
        clock=loop.time,
        wall_clock=lambda: EPOCH + loop.time(),
    )


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` to completion on a fresh `VirtualTimeLoop`, then cancel what it left running."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(main)
    finally:
        leftovers = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in leftovers:
            task.cancel()
        if leftovers:
            loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
