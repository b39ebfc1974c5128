"""`Deadlines`: the deadlines of runs awaited in their caller's task, kept by one timer.

An in-process ``send`` (and `TimeoutBehavior`) must cancel a handler at its deadline, yet most
handlers return without ever suspending, and for those a timer per call (``asyncio.timeout``: a
`TimerHandle`, a heap push and a cancel) or stepping the coroutine by hand (a `StopIteration` per
call) costs several times the call itself. Here a run costs a clock read and a few attribute
writes:

- the run that started last is `Deadlines.current`, with its deadline, and no other record;
- a run that starts while another is `current` (which has then suspended, or started this one)
  moves that one to the parked runs, a dict;
- one loop timer is armed at the earliest deadline. It is re-armed only for a run whose deadline
  is earlier than the armed one, so with one budget for every call it is armed about once per
  budget: when it fires, the runs past their deadline have their task cancelled, and it is armed
  again at the next deadline, or not at all.

A run's task is looked up only when its deadline passes, by walking each task's chain of awaited
coroutines; a run that completes is never looked at. Expiries are batched: the timer fires at
most once per ten times the last look-up took (1 ms at least), so that many runs passing their
deadlines one after another cannot spend more than about a tenth of the loop on look-ups; a
cancellation may come that much late, never early.

`Deadlines.run` awaits a run under its deadline. The in-process ``send`` (`Mediator.send`) writes
the same steps inline, as it has a frame of its own to run them in: a frame costs about as much as
all of them.

As with ``asyncio.timeout``, the cancellation is the task's: a run that swallows it keeps going,
and when it ends the cancellation request is withdrawn; what it returned is dropped, and its caller
told the deadline passed, as a remote caller would have been (one that never ends holds its
caller: only a run in a task of its own could be left behind). So is what a run returns after its
deadline without ever suspending (it held the loop: no timer could fire).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
from collections.abc import Callable, Coroutine, Iterable
from types import AsyncGeneratorType
from typing import Any

__all__ = ["DeadlinePassed", "Deadlines"]

logger = logging.getLogger(__name__)

Run = Coroutine[Any, Any, Any]
_MIN_GAP = 0.001  # s between two expiries, at least


class DeadlinePassed(Exception):
    """`Deadlines.run` cancelled the run at its deadline (not an error the run raised)."""


class Deadlines:
    """Deadlines of runs awaited in their callers' tasks, on one event loop (see the module).

    Args:
        clock: seconds, monotonic; the loop's own clock or one that runs at its pace.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        #: The run started last, unless it ended; and its deadline.
        self.current: Run | None = None
        self.current_deadline = math.inf
        #: The deadline the timer is armed for (infinity: not armed).
        self.timer_at = math.inf
        #: Runs cancelled at their deadline, with their task and its pending cancellations before.
        self.expired: dict[Run, tuple[asyncio.Task[Any], int]] = {}
        self._parked: dict[Run, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._not_before = -math.inf  # the timer fires no sooner (expiries batched, see the module)

    async def run(self, coro: Run, budget: float, *, keep_late: bool = False) -> Any:
        """Await ``coro``, cancelled ``budget`` seconds from now if it has not ended by then.
        (`Mediator.send` has the same steps inline: a change here is one there too.)

        Args:
            keep_late: return what a run that ended after its deadline returned (one that swallowed
                the cancellation, or never suspended: a publish the broker took late was taken);
                otherwise it is `DeadlinePassed` too.

        Raises:
            DeadlinePassed: it was cancelled at its deadline.
        """
        deadline = self.clock() + budget
        if self.current is not None:
            self.park()
        self.current, self.current_deadline = coro, deadline
        if deadline < self.timer_at:
            self.arm(deadline)
        late = False
        try:
            result = await coro
        except asyncio.CancelledError:
            if self.timed_out(coro):
                raise DeadlinePassed from None
            raise
        finally:
            if self.current is coro:
                self.current = None
            else:
                late = self.ended(coro)
        if (late or self.clock() > deadline) and not keep_late:  # swallowed, or never suspended
            raise DeadlinePassed
        return result

    def park(self) -> None:
        """Keep `current` among the parked runs: another run starts."""
        assert self.current is not None
        self._parked[self.current] = self.current_deadline

    def arm(self, deadline: float) -> None:
        """Fire at ``deadline`` (earlier than the armed one), or as soon after as batching allows."""
        if self._timer is not None:
            self._timer.cancel()
        delay = max(deadline, self._not_before) - self.clock()
        self._timer = asyncio.get_running_loop().call_later(max(0.0, delay), self._fire)
        self.timer_at = deadline

    def ended(self, run: Run) -> bool:
        """``run`` ended, and it is not `current`: forget it. True when it had been cancelled at its
        deadline and swallowed that (the cancellation request is withdrawn): it ended late."""
        self._parked.pop(run, None)
        expired = self.expired.pop(run, None) if self.expired else None
        if expired is None:
            return False
        expired[0].uncancel()
        return True

    def timed_out(self, run: Run) -> bool:
        """Whether the `CancelledError` that ends ``run`` is its deadline's (and no one else's)."""
        expired = self.expired.pop(run, None) if self.expired else None
        if expired is None:
            return False
        task, pending_before = expired
        return task.uncancel() <= pending_before

    def _fire(self) -> None:
        self._timer, self.timer_at = None, math.inf
        now = self.clock()
        parked = self._parked
        due = [run for run, deadline in parked.items() if deadline <= now]
        for run in due:
            del parked[run]
        if self.current is not None and self.current_deadline <= now:
            due.append(self.current)
            self.current = None
        if due:
            self._cancel(due)
            self._not_before = now + max(_MIN_GAP, 10 * (self.clock() - now))  # the look-up's time
        nearest = min(parked.values(), default=math.inf)
        if self.current is not None:
            nearest = min(nearest, self.current_deadline)
        if nearest < math.inf:
            self.arm(nearest)

    def _cancel(self, runs: list[Run]) -> None:
        left = set(runs)
        for task in asyncio.all_tasks():
            if not left:
                break
            found = False
            for awaited in _chain(task.get_coro()):
                if awaited not in left:
                    continue
                left.discard(awaited)
                if not found:  # the outermost due run of this task times out; the ones it awaits
                    found = True  # are cancelled with it, as its own steps
                    self.expired[awaited] = (task, task.cancelling())
                    task.cancel()
        if left:  # not reachable through the links `_chain` follows: an unusual awaitable between
            logger.error(
                "could not cancel %d run(s) at their deadline: no task is found awaiting them (an "
                "awaitable that hides what it awaits sits between the task and the run); they go on",
                len(left),
            )


def _chain(awaited: Any) -> Iterable[Any]:
    """``awaited``, what it awaits, what that awaits, ... (coroutines, generators, async generators,
    and what ``async for`` and ``anext`` await them through)."""
    while awaited is not None:
        yield awaited
        awaited = (
            getattr(awaited, "cr_await", None)
            or getattr(awaited, "gi_yieldfrom", None)
            or getattr(awaited, "ag_await", None)
            or _async_generator_of(awaited)
        )


def _async_generator_of(awaited: Any) -> Any:
    """The async generator an ``asend``/``athrow`` awaitable steps (it shows no link of its own)."""
    if type(awaited).__name__ not in ("async_generator_asend", "async_generator_athrow"):
        return None
    return next((ref for ref in gc.get_referents(awaited) if isinstance(ref, AsyncGeneratorType)), None)
