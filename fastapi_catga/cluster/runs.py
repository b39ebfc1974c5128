"""The tasks a node's `Responder` starts (`Runs`): handler runs, each holding its slot of the
node's `HandlerLimits` until it ends; "busy" answers to requests refused for want of a slot; and a
stop that cannot hang.

A "busy" answer is one small task that holds the reply address, the encoded error and a line for
the log, never the refused request itself (whose body may be as large as the broker allows): at
most `MAX_BUSY_REPLIES` may wait for the broker at once, so they hold a few hundred KiB at most.
Past that the broker takes no replies anyway, and a request is left unanswered (its caller times
out) rather than let tasks pile up.

Most handlers end in their first step. On 3.12+ a request's run is an eager task; on 3.11 the
intake (`Runs._take`) takes such first steps in turn, in one task, and only a run that suspends
keeps a task of its own.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import operator
import sys
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import Any, cast

from fastapi_catga.cluster.limits import HandlerLimits
from fastapi_catga.core.envelope import MESSAGE_ID, MESSAGE_TYPE, SOURCE, Envelope, encode_error
from fastapi_catga.core.logs import LogLimiter
from fastapi_catga.exceptions import BusyError, CatgaError
from fastapi_catga.transports.base import Delivery, Reply

__all__ = ["EAGER_TASKS", "MAX_BUSY_REPLIES", "Run", "Runs", "describe"]

logger = logging.getLogger(__name__)

#: "Busy" replies not yet handed to the broker, at most.
MAX_BUSY_REPLIES = 1000
_PLAIN_TASKS = 64  # eager runs started as plain tasks after one suspended in the intake (3.11)
_CANCEL_GRACE = 1.0  # s a stopping node waits for cancelled handler runs to end before abandoning them


#: What a run is of, as `Runs.spawn` is told: a name, the message it runs, or the request (whose
#: caller a stopping node answers when the run will not end: `Runs.stop`).
Run = str | Envelope | Delivery


def describe(what: Envelope | Delivery) -> str:
    """A message as the log names it: type, id and sender, each cut short."""
    headers = (what.envelope if isinstance(what, Delivery) else what).headers
    parts = (headers.get(MESSAGE_TYPE, "?"), headers.get(MESSAGE_ID, "?"), headers.get(SOURCE, "?"))
    type_name, message_id, source = (str(part)[:80] for part in parts)
    return f"{type_name} {message_id} from {source}"


#: Python 3.12+ starts a task eagerly (its first step now, in the caller); 3.11 cannot, and the
#: intake stands in for it (`Runs._take`).
EAGER_TASKS = sys.version_info >= (3, 12)

if sys.version_info >= (3, 12):

    def _start(
        loop: asyncio.AbstractEventLoop,
        work: Coroutine[Any, Any, None],
        eager: bool,
        context: contextvars.Context | None,
    ) -> asyncio.Task[None]:
        # An eager task runs its first step now, as itself (its own context, the current task): a
        # handler that ends in it (most) is never scheduled and costs no loop turn.
        return asyncio.Task(work, loop=loop, eager_start=eager, context=context)

else:

    def _start(
        loop: asyncio.AbstractEventLoop,
        work: Coroutine[Any, Any, None],
        eager: bool,
        context: contextvars.Context | None,
    ) -> asyncio.Task[None]:
        return loop.create_task(work, context=context)


def _retrieve(task: asyncio.Task[None], what: Run) -> None:
    """What an ended run's task raised, said in the log now (not "Task exception was never
    retrieved" whenever it is collected): a run answers its handler's errors, so only a bug (in
    catga or a behavior) gets here."""
    if not task.cancelled() and (error := task.exception()) is not None:
        _log_failure(what, error)


def _log_failure(what: Run, error: BaseException | None) -> None:
    """A run that raised (its own errors are answers: this is a bug, in catga or a behavior)."""
    logger.error("a run of %s failed", what if isinstance(what, str) else describe(what), exc_info=error)


#: Whether a running task will be cancelled at its next suspension (3.11, where the intake runs: its
#: tasks have the flag). `Task.cancelling` is not enough: before 3.13, `Task.uncancel` lowers the
#: count of requests but leaves the cancellation pending.
_cancel_pending: Callable[[asyncio.Task[None]], bool] = operator.attrgetter("_must_cancel")


class _Continue:
    """Awaits the rest of a coroutine whose first step ran in ``context`` (each step runs there).

    Its own iterator, not a generator, so that it can show the coroutine it runs as ``cr_await``:
    `Deadlines` finds a run's task by following those links down from each task.
    """

    __slots__ = ("_context", "_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, None], first: Any, context: contextvars.Context) -> None:
        self._coro = coro
        self._first: Any = first
        self._context = context

    @property
    def cr_await(self) -> Coroutine[Any, Any, None]:
        return self._coro

    def __await__(self) -> Generator[Any, Any, None]:
        return cast(Generator[Any, Any, None], self)  # the generator protocol, by hand

    def __iter__(self) -> _Continue:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, value: Any) -> Any:
        first = self._first
        if first is not _STEPPED:  # the awaited future of the first step, handed to the task
            self._first = _STEPPED
            return first
        return self._context.run(self._coro.send, value)  # its StopIteration ends the await

    def throw(self, error: BaseException) -> Any:  # a cancellation, thrown in by the task
        self._first = _STEPPED
        return self._context.run(self._coro.throw, error)

    def close(self) -> None:
        self._context.run(self._coro.close)


_STEPPED: Any = object()


class Runs:
    """The responder's tasks; ``limits`` gets each run's slot back when the run ends."""

    def __init__(self, limits: HandlerLimits, node_id: str, log_limit: LogLimiter) -> None:
        self._limits = limits
        self._node_id = node_id
        self._log_limit = log_limit
        #: Each task going on, with the type whose slot it holds and what it runs (for the log).
        self._tasks: dict[asyncio.Task[None], tuple[str | None, Run]] = {}
        #: "busy" answers not yet handed to the broker.
        self.busy_replies = 0
        #: 3.11: eager runs whose first step the intake has not taken yet, and the intake's task.
        self._queue: deque[tuple[Coroutine[Any, Any, None], Run, str | None, contextvars.Context]] = deque()
        self._intake: asyncio.Task[None] | None = None
        self._stopping = False
        #: Eager runs still to start as plain tasks because a run lately suspended in the intake.
        self._plain_tasks = 0

    def spawn(
        self,
        work: Coroutine[Any, Any, None],
        what: Run,
        slot: str | None = None,
        *,
        eager: bool = False,
        context: contextvars.Context | None = None,
    ) -> None:
        """Run ``work`` in a task, in ``context`` or a copy of the current one; ``what`` names it in
        the log (an envelope: the message it runs, described only if it must be). ``slot``: the
        type whose slot the caller took for it; it is given back when the run ends, or here if it
        could not be started.

        ``eager``: its first step runs before anything else is scheduled, and a run that ends in
        it (most) costs no task of its own (3.12+: an eager task; 3.11: the intake, see `_take`).
        Not for runs started by a slot given back (`HandlerLimits.leave` starts waiting events:
        eager ones ending at once would nest one call per event)."""
        try:
            # The loop is looked up only where it is needed: on 3.11 each look-up is a getpid() call.
            if eager and not EAGER_TASKS and self._tasks_for() == 0:
                if self._intake is None:
                    self._start_intake(asyncio.get_running_loop())
                # Its own context, copied now, as a task started here would get it.
                self._queue.append((work, what, slot, contextvars.copy_context()))
                return
            task = _start(asyncio.get_running_loop(), work, eager, context)
        except BaseException:
            work.close()
            if slot is not None:
                self._limits.leave(slot)
            raise
        if task.done():  # it ended in its first step (eager start, 3.12+): nothing to track
            if slot is not None:
                self._limits.leave(slot)
            if not task.cancelled() and (error := task.exception()) is not None:
                _log_failure(what, error)  # as the intake does, not whenever the task is collected
            return
        self._tasks[task] = (slot, what)
        task.add_done_callback(self._ended)  # one callback: slot and bookkeeping together

    def _ended(self, task: asyncio.Task[None]) -> None:
        slot, what = self._tasks.pop(task)
        if slot is not None:
            self._limits.leave(slot)
        _retrieve(task, what)

    # -- 3.11: the intake, in place of eager tasks ------------------------------------------------

    def _tasks_for(self) -> int:
        """How many more eager runs start as plain tasks (0: this one goes to the intake)."""
        left = self._plain_tasks
        if left:
            self._plain_tasks = left - 1
        return left

    def _start_intake(self, loop: asyncio.AbstractEventLoop) -> None:
        take = self._take()
        try:
            intake = loop.create_task(take)
        except BaseException:
            take.close()
            raise
        self._intake = intake
        self._tasks[intake] = (None, "the intake of requests")
        intake.add_done_callback(self._intake_ended)

    async def _take(self) -> None:
        """Take the first step of each queued run in turn, each in its own copy of the context, as
        an eager task would: a run that ends in it (most) costs no task and no loop turn of its own.

        The first run that suspends keeps this task, which sees it to its end: a timeout, a task
        group or anything else its first step tied to the current task is tied to the task that
        goes on running it. The runs still queued then get a task each; later ones a new intake.
        """
        queue, limits = self._queue, self._limits
        me = self._intake
        assert me is not None  # this task
        while queue:
            work, what, slot, context = queue.popleft()
            try:
                signal = context.run(work.send, None)
            except StopIteration:
                if slot is not None:
                    limits.leave(slot)
                if _cancel_pending(me):
                    return self._cancelled_by_a_run(me)
                continue
            except Exception:  # what a task would hold as its exception: said in the log instead
                if slot is not None:
                    limits.leave(slot)
                _log_failure(what, sys.exception())
                if _cancel_pending(me):
                    return self._cancelled_by_a_run(me)
                continue
            except BaseException:
                if slot is not None:
                    limits.leave(slot)
                raise
            # It suspended: this task is the run's from now on.
            self._intake = None
            self._tasks[me] = (slot, what)
            # The rest of the queue gets a task each, as without the intake, all started in this
            # loop turn: a new intake would take one run per turn while each suspends (a Redis
            # reply waits for its PUBLISH), and what they send would no longer go out together.
            # So do the next runs: where runs suspend, the intake only costs (one in
            # `_PLAIN_TASKS` + 1 still goes to it, to notice when they stop suspending).
            self._plain_tasks = _PLAIN_TASKS
            while queue:
                rest, rest_what, rest_slot, rest_context = queue.popleft()
                self.spawn(rest, rest_what, rest_slot, context=rest_context)
            try:
                await _Continue(work, signal, context)
            finally:
                if slot is not None:
                    limits.leave(slot)
            return
        # Every run ended in its first step: `_intake_ended`'s bookkeeping is done here, and the
        # callback dropped, so that this task's end schedules nothing (when requests come one at
        # a time, that was a turn of the event loop per request).
        self._intake_over(me)

    def _intake_over(self, me: asyncio.Task[None]) -> None:
        """`_intake_ended`'s bookkeeping, done by the intake itself as it ends with no run of its
        own: its end schedules nothing, and a run spawned after this needs a new intake at once."""
        self._intake = None
        me.remove_done_callback(self._intake_ended)
        self._tasks.pop(me, None)

    def _cancelled_by_a_run(self, me: asyncio.Task[None]) -> None:
        """A run that has ended asked for its task's cancellation (``current_task().cancel()``):
        the intake's, whose next run to suspend would get it. Only this code runs in the intake
        meanwhile, so nothing else asked. The request goes with this task, cancelled as it ends;
        the runs still queued get a task each."""
        self._intake_over(me)
        while self._queue:
            work, what, slot, context = self._queue.popleft()
            self.spawn(work, what, slot, context=context)

    def _intake_ended(self, task: asyncio.Task[None]) -> None:
        _, what = self._tasks.pop(task, (None, "the intake of requests"))
        _retrieve(task, what)
        if self._intake is not task:
            return  # it took the whole queue, or went on to run one that suspended
        self._intake = None  # cancelled (a stop), or ended by an error that was no Exception
        if not self._queue:
            return
        if not self._stopping:
            self._start_intake(asyncio.get_running_loop())
            return
        while self._queue:  # a stopping node runs no more of them: never started, their slots back
            work, _, slot, _ = self._queue.popleft()
            work.close()
            if slot is not None:
                self._limits.leave(slot)

    def busy(self, reply: Reply, error: BusyError, what: str) -> bool:
        """Answer ``error`` through ``reply`` in a small task (``what`` names the request in the
        log); False, and nothing sent, when `MAX_BUSY_REPLIES` answers already wait."""
        if self.busy_replies >= MAX_BUSY_REPLIES:  # the broker takes no replies: keep memory flat
            return False
        self.busy_replies += 1
        answer = encode_error(error, node_id=self._node_id, by_node=True)
        try:
            self.spawn(self._send_busy(reply, answer, what), "busy")
        except BaseException:
            self.busy_replies -= 1
            raise
        return True

    async def _send_busy(self, reply: Reply, answer: Envelope, what: str) -> None:
        try:
            await reply(answer)
        except CatgaError as exc:
            self._log_limit.log(logger, logging.WARNING, "reply", "could not answer %s: %s", what, exc)
        finally:
            self.busy_replies -= 1

    @property
    def stopping(self) -> bool:
        """Whether `stop` is cancelling the runs still going (a run's cancellation is then the node's)."""
        return self._stopping

    def _name(self, task: asyncio.Task[None]) -> str:
        what = self._tasks.get(task, (None, task.get_name()))[1]
        return what if isinstance(what, str) else describe(what)

    async def stop(self, drain_timeout: float) -> list[Run]:
        """Wait up to ``drain_timeout`` for the tasks (events still waiting for a slot are then
        dropped and counted); cancel what is left and wait at most one second more for it to end.
        A run that ignores its cancellation is abandoned, named in the log, and returned (what it
        was spawned with): its caller is still to be answered."""
        loop = asyncio.get_running_loop()
        ends = loop.time() + drain_timeout
        while self._tasks and (left := ends - loop.time()) > 0:  # runs that free a slot start events
            await asyncio.wait(set(self._tasks), timeout=left)
        if dropped := self._limits.drop_waiting():
            logger.warning("dropped %d received event(s) still waiting for a handler slot", dropped)
        if not self._tasks:
            return []
        self._stopping = True
        pending = set(self._tasks)
        for task in pending:
            task.cancel()
        logger.warning("cancelled %d handler run(s) still going after %.1f s", len(pending), drain_timeout)
        _, stuck = await asyncio.wait(pending, timeout=_CANCEL_GRACE)
        if stuck:
            names = sorted(self._name(task) for task in stuck)
            logger.error(
                "abandoned %d handler run(s) that did not end when cancelled: %s%s",
                len(stuck), ", ".join(names[:10]), " ..." if len(names) > 10 else "",
            )  # fmt: skip
        return [self._tasks[task][1] for task in stuck if task in self._tasks]
