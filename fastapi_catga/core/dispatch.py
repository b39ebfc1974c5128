"""Local dispatch: the composed pipelines of one node's handlers, and how their outcomes surface.

Every path that runs a command or query on this node (a `send` routed to this node, a request
from another node) runs it through `LocalDispatcher.run_request`, so each gets the same deadline,
the same result validation and the same errors; the in-process `send` (`Mediator.send`) takes the
same steps inline, with this dispatcher's result checks and errors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import TypeAdapter, ValidationError

from fastapi_catga.core.deadlines import DeadlinePassed, Deadlines
from fastapi_catga.core.envelope import encode_error, error_from_reply, validation_details
from fastapi_catga.core.handlers import HandlerRegistry
from fastapi_catga.core.logs import LogLimiter
from fastapi_catga.core.messages import Event, Message, Request
from fastapi_catga.core.pipeline import Pipeline, PipelineBehavior, build_pipeline
from fastapi_catga.core.raised import is_handler_error
from fastapi_catga.exceptions import CatgaError, HandlerNotFoundError, RemoteHandlerError

__all__ = ["LocalDispatcher", "Pipeline"]

logger = logging.getLogger(__name__)


class LocalDispatcher:
    """Runs this node's handlers through their pipelines, composed once at construction.

    Args:
        registry: the handlers this node runs.
        behaviors: pipeline behaviors, outermost first.
        node_id: this node, named in errors.
        expose_errors: put a failing handler's exception text in the error the caller gets
            (development only: the text may hold data the caller should not see). Either way it
            is logged here, with its traceback.
        clock: seconds, monotonic, at the event loop's pace: runs' deadlines (`Deadlines`).
    """

    def __init__(
        self,
        registry: HandlerRegistry,
        behaviors: Sequence[PipelineBehavior],
        node_id: str,
        *,
        expose_errors: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.node_id = node_id
        self.expose_errors = expose_errors
        self.requests: dict[type[Message], Pipeline] = {
            message_type: build_pipeline(spec.func, behaviors, message_type)
            for message_type, spec in registry.requests.items()
        }
        self._events: dict[type[Message], list[tuple[str, Pipeline]]] = {
            message_type: [(spec.name, build_pipeline(spec.func, behaviors, message_type)) for spec in specs]
            for message_type, specs in registry.events.items()
        }
        self.types: dict[str, type[Message]] = {
            message_type.type_name: message_type for message_type in [*self.requests, *self._events]
        }
        self._log_limit = LogLimiter()
        #: The payload limit of the node's broker (its node sets it): what an error reply may hold.
        self.payload_limit: Callable[[], int | None] = lambda: None
        #: The node's runs awaited in their caller's task, under one timer: this dispatcher's,
        #: the in-process `send`'s and the node's publishes.
        self.deadlines = Deadlines(clock)
        #: Per request type, the class a result can be as it is (its exact instances pass unchecked).
        self.exact_results: dict[type[Message], type] = {}
        #: Per request type, the check of a handler's result against the declared type.
        self.result_checks = self._result_checks()

    def event_pipelines(self) -> dict[type[Message], list[tuple[str, Pipeline]]]:
        """Each event type's handlers by name, with their composed pipelines."""
        return self._events

    def handles(self, message_type: type[Message]) -> bool:
        """Whether a handler for this type runs here."""
        return message_type in self.requests or message_type in self._events

    async def handle_request(
        self, message: Request[Any], timeout: float | None = None, *, keep_late: bool = False
    ) -> Any:
        """Run the command's or query's handler here, within ``timeout`` seconds if given.

        ``keep_late``: return what a run that ended after ``timeout`` returned (its caller, this
        task, still waits: a run-here attempt past its share of the deadline), see `Deadlines.run`.

        Raises:
            HandlerNotFoundError: no handler for it on this node.
            CatgaError: what the handler raised, other exceptions as `RemoteHandlerError`, a result
                that does not match the result type as `RemoteHandlerError` too.
            TimeoutError: the builtin one, never a handler's: ``timeout`` passed and the run was cancelled.
        """
        pipeline = self.requests.get(type(message))
        if pipeline is None:
            raise HandlerNotFoundError(f"no handler for {message.type_name} on node {self.node_id}")
        return await self.run_request(pipeline, message, timeout, keep_late=keep_late)

    async def run_request(
        self, pipeline: Pipeline, message: Request[Any], timeout: float | None, *, keep_late: bool = False
    ) -> Any:
        """`handle_request` for a pipeline already looked up.

        Raises:
            TimeoutError: the builtin one, never a handler's: ``timeout`` passed and the run was cancelled.
        """
        try:
            if timeout is None:
                result = await pipeline(message)
            else:
                result = await self.deadlines.run(pipeline(message), timeout, keep_late=keep_late)
        except DeadlinePassed:
            raise TimeoutError from None
        except BaseException as exc:
            if not is_handler_error(exc):
                raise
            raise self.handler_error(exc, message) from exc
        check = self.result_checks.get(type(message))  # `check_of`, inline: it runs on every request
        return result if check is None else check(message, result)

    def check_of(self, message_type: type[Message]) -> Callable[[Request[Any], Any], Any]:
        """How a result of ``message_type``'s handler is checked: returned as the declared result
        type, or `RemoteHandlerError` when it is not one."""
        return self.result_checks.get(message_type, _unchecked)

    def _result_checks(self) -> dict[type[Message], Callable[[Request[Any], Any], Any]]:
        """Per request type, how a handler's result is validated against the declared type; none
        for ``Any``. A result of exactly the declared class is what validation would return."""
        checks: dict[type[Message], Callable[[Request[Any], Any], Any]] = {}
        for message_type in self.requests:
            assert issubclass(message_type, Request)
            adapter = message_type.result_adapter()
            declared = adapter.core_schema.get("cls") if adapter.core_schema["type"] == "model" else None
            exact = declared or _PLAIN.get(adapter.core_schema["type"])
            if exact is not None:
                self.exact_results[message_type] = exact
            if adapter.core_schema["type"] != "any":
                checks[message_type] = _checker(adapter, exact, self.node_id)
        return checks

    def handler_error(self, exc: BaseException, message: Message) -> CatgaError:
        """What the caller gets when a handler raised ``exc`` (`is_handler_error`): a `CatgaError`
        as its class (it is meant for the caller), anything else as a `RemoteHandlerError` naming
        its type; the text stays in this node's log unless ``expose_errors``. Either way as a caller
        on another node reads it from the error reply (`as_sent`): the same call ends the same way
        wherever it ran (details that are no JSON, a text over the payload limit, a subclass that
        skipped ``CatgaError.__init__``)."""
        if isinstance(exc, CatgaError):
            return self.as_sent(exc)
        error_type = type(exc).__name__
        self._log_limit.log(
            logger, logging.ERROR, (message.type_name, error_type), "%s handler raised %s on %s (message %s)",
            message.type_name, error_type, self.node_id, message.message_id, exc_info=exc,
        )  # fmt: skip
        text = f"{message.type_name} handler raised {error_type} on node {self.node_id}"
        text += f" (message {message.message_id})"
        if self.expose_errors:
            try:
                text += f": {exc}"
            except Exception as broken:  # its __str__ raises: the error still gets its answer
                text += f" (its text could not be read: {type(broken).__name__})"
        return self.as_sent(
            RemoteHandlerError(text, error_type=error_type, node_id=self.node_id, retryable=_retryable(exc))
        )

    def as_sent(self, error: CatgaError) -> CatgaError:
        """``error`` as this node's error reply carries it to a caller elsewhere: a new instance of
        its class (or its nearest known base) with its message, details and retryable flag."""
        reply = encode_error(error, node_id=self.node_id, max_payload=self.payload_limit())
        return error_from_reply(reply)  # total: an error reply always reads as some CatgaError

    async def handle_event(self, event: Event) -> int:
        """Run every handler of the event here, one after another; returns how many failed.

        A failing handler is logged and does not stop the others.
        """
        failed = 0
        for name, pipeline in self._events.get(type(event), ()):
            try:
                await pipeline(event)
            except BaseException as exc:
                if not is_handler_error(exc):
                    raise
                failed += 1
                self._log_limit.log(
                    logger, logging.ERROR, (name, type(exc).__name__), "event handler %s failed on %s %s",
                    name, event.type_name, event.message_id, exc_info=exc,
                )  # fmt: skip
        return failed


def _retryable(exc: BaseException) -> bool:
    """A foreign exception's own ``retryable`` flag, if it has one that can be read."""
    try:
        return bool(getattr(exc, "retryable", False))
    except Exception:  # a property that raises
        return False


def _unchecked(message: Request[Any], result: Any) -> Any:
    return result  # declared ``Any``


# Result types whose exact instances validation returns unchanged.
_PLAIN: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool, "bytes": bytes}


def _checker(
    adapter: TypeAdapter[Any], exact: type | None, node_id: str
) -> Callable[[Request[Any], Any], Any]:
    validate = adapter.validate_python

    def check(message: Request[Any], result: Any) -> Any:
        if exact is not None and type(result) is exact:
            return result
        try:
            return validate(result)
        except ValidationError as exc:
            raise RemoteHandlerError(
                f"{message.type_name} handler on node {node_id} returned a result that does not "
                f"match its result type (message {message.message_id})",
                error_type="ResultValidationError",
                node_id=node_id,
                details=validation_details(exc),
            ) from exc

    return check
