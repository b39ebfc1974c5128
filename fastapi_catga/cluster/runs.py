"""The tasks a node's `Responder` starts (`Runs`): handler runs, each holding its slot of the
node's `HandlerLimits` until it ends; "busy" answers to requests refused for want of a slot; and a
stop that cannot hang.

A "busy" answer is one small task that holds the reply address, the encoded error and a line for
the log, never the refused request itself (whose body may be as large as the broker allows): at
most `MAX_BUSY_REPLIES` may wait for the broker at once, so they hold a few hundred KiB at most.
Past that the broker takes no replies anyway, and a request is left unanswered (its caller times
out) rather than let tasks pile up.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Coroutine
from typing import Any

from fastapi_catga.cluster.limits import HandlerLimits
from fastapi_catga.core.envelope import MESSAGE_ID, MESSAGE_TYPE, SOURCE, Envelope, encode_error
from fastapi_catga.core.logs import LogLimiter
from fastapi_catga.exceptions import BusyError, CatgaError
from fastapi_catga.transports.base import Reply

__all__ = ["MAX_BUSY_REPLIES", "Runs", "describe"]

logger = logging.getLogger(__name__)

#: "Busy" replies not yet handed to the broker, at most.
MAX_BUSY_REPLIES = 1000
_CANCEL_GRACE = 1.0  # s a stopping node waits for cancelled handler runs to end before abandoning them


def describe(envelope: Envelope) -> str:
    """A message as the log names it: type, id and sender, each cut short."""
    headers = envelope.headers
    parts = (headers.get(MESSAGE_TYPE, "?"), headers.get(MESSAGE_ID, "?"), headers.get(SOURCE, "?"))
    type_name, message_id, source = (str(part)[:80] for part in parts)
    return f"{type_name} {message_id} from {source}"


if sys.version_info >= (3, 12):

    def _start(
        loop: asyncio.AbstractEventLoop, work: Coroutine[Any, Any, None], eager: bool
    ) -> asyncio.Task[None]:
        # An eager task runs its first step now, as itself (its own context, the current task): a
        # handler that ends in it (most) is never scheduled and costs no loop turn.
        return asyncio.Task(work, loop=loop, eager_start=eager)

else:

    def _start(
        loop: asyncio.AbstractEventLoop, work: Coroutine[Any, Any, None], eager: bool
    ) -> asyncio.Task[None]:
        return loop.create_task(work)


class Runs:
    """The responder's tasks; ``limits`` gets each run's slot back when its task ends."""

    def __init__(self, limits: HandlerLimits, node_id: str, log_limit: LogLimiter) -> None:
        self._limits = limits
        self._node_id = node_id
        self._log_limit = log_limit
        #: Each task going on, with the type whose slot it holds and what it runs (for the log).
        self._tasks: dict[asyncio.Task[None], tuple[str | None, str | Envelope]] = {}
        #: "busy" answers not yet handed to the broker.
        self.busy_replies = 0

    def spawn(
        self,
        work: Coroutine[Any, Any, None],
        what: str | Envelope,
        slot: str | None = None,
        *,
        eager: bool = False,
    ) -> None:
        """Run ``work`` in a task; ``what`` names it in the log (an envelope: the message it runs,
        described only if it must be). ``slot``: the type whose slot the caller took for it; it is
        given back when the task ends, or here if no task could be started. ``eager`` (3.12+): its
        first step runs now; not for runs started by a slot given back (`HandlerLimits.leave`
        starts waiting events: eager ones ending at once would nest one call per event)."""
        try:
            task = _start(asyncio.get_running_loop(), work, eager)
        except BaseException:
            work.close()
            if slot is not None:
                self._limits.leave(slot)
            raise
        if task.done():  # it ended in its first step (eager start, 3.12+): nothing to track
            if slot is not None:
                self._limits.leave(slot)
            return
        self._tasks[task] = (slot, what)
        task.add_done_callback(self._ended)  # one callback: slot and bookkeeping together

    def _ended(self, task: asyncio.Task[None]) -> None:
        slot, _ = self._tasks.pop(task)
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

    def _name(self, task: asyncio.Task[None]) -> str:
        what = self._tasks.get(task, (None, task.get_name()))[1]
        return what if isinstance(what, str) else describe(what)

    async def stop(self, drain_timeout: float) -> None:
        """Wait up to ``drain_timeout`` for the tasks (events still waiting for a slot are then
        dropped and counted); cancel what is left and wait at most one second more for it to end.
        A run that ignores its cancellation is abandoned, and named in the log."""
        loop = asyncio.get_running_loop()
        ends = loop.time() + drain_timeout
        while self._tasks and (left := ends - loop.time()) > 0:  # runs that free a slot start events
            await asyncio.wait(set(self._tasks), timeout=left)
        if dropped := self._limits.drop_waiting():
            logger.warning("dropped %d received event(s) still waiting for a handler slot", dropped)
        if not self._tasks:
            return
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
