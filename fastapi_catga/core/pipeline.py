"""Pipeline behaviors: code that wraps every handler call, composed once per handler (an onion)."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Protocol, runtime_checkable

from fastapi_catga.core.messages import Message

__all__ = ["CallNext", "Pipeline", "PipelineBehavior", "as_pipeline", "build_pipeline"]

#: Runs the rest of the pipeline (the next behaviors, then the handler) and returns its result.
CallNext = Callable[[], Awaitable[Any]]
#: A handler, or a handler inside its behaviors: takes the message, returns the coroutine that runs it.
Pipeline = Callable[[Any], Coroutine[Any, Any, Any]]


@runtime_checkable
class PipelineBehavior(Protocol):
    """Wraps handler calls on the node that runs the handler.

    A behavior calls ``call_next()`` to go on (any number of times, or not at all) and returns
    what the caller of ``send`` should get. For events the result is ignored.

        class Timing:
            async def __call__(self, message: Message, call_next: CallNext) -> Any:
                started = time.perf_counter()
                try:
                    return await call_next()
                finally:
                    log.info("%s took %.1f ms", message.type_name, (time.perf_counter() - started) * 1e3)

    A behavior may also define ``applies_to(message_type) -> bool`` to skip some message types;
    it is asked once, when the pipeline is built. And it may define ``compose(inner) -> Pipeline``,
    a coroutine function that does what ``__call__`` does around ``inner(message)``: the pipeline
    then calls that, one coroutine per call instead of three (the built-in behaviors do).
    """

    async def __call__(self, message: Message, call_next: CallNext) -> Any: ...


def build_pipeline(
    handler: Pipeline, behaviors: Sequence[PipelineBehavior], message_type: type[Message]
) -> Pipeline:
    """Compose ``behaviors`` around ``handler``, the first behavior outermost.

    With no behavior that applies, the handler itself is returned: no cost per message.
    """
    step = handler
    for behavior in reversed(behaviors):
        applies_to: Callable[[type[Message]], bool] | None = getattr(behavior, "applies_to", None)
        if applies_to is None or applies_to(message_type):
            compose: Callable[[Pipeline], Pipeline] | None = getattr(behavior, "compose", None)
            step = _wrap(behavior, step) if compose is None else _awaited(compose(step))
    return step


def _awaited(step: Pipeline) -> Pipeline:
    """``step`` as a coroutine function: a composed step written as a plain def, by mistake, then
    raises in the run (a handler error, on every path), not in the caller's call that makes it."""
    if inspect.iscoroutinefunction(step):
        return step

    async def awaited(message: Any) -> Any:
        return await step(message)

    return awaited


def _wrap(behavior: PipelineBehavior, inner: Pipeline) -> Pipeline:
    async def step(message: Any) -> Any:
        return await behavior(message, lambda: inner(message))

    return step


def as_pipeline(call_next: CallNext) -> Pipeline:
    """``call_next`` as a pipeline step (ignores the message it is given): how a behavior that
    has ``compose`` runs its ``__call__``."""

    async def inner(message: Any) -> Any:
        return await call_next()

    return inner
