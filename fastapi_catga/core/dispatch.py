"""Local dispatch: the composed pipelines of one node's handlers, and how their failures surface."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi_catga.core.handlers import HandlerRegistry
from fastapi_catga.core.messages import Event, Message, Request
from fastapi_catga.core.pipeline import PipelineBehavior, build_pipeline
from fastapi_catga.exceptions import CatgaError, HandlerNotFoundError, RemoteHandlerError

__all__ = ["LocalDispatcher", "handler_error"]

logger = logging.getLogger(__name__)

Pipeline = Callable[[Any], Awaitable[Any]]


def handler_error(exc: Exception, message: Message, node_id: str) -> CatgaError:
    """What the caller gets when a handler raised ``exc``: `CatgaError`s as they are, others wrapped."""
    if isinstance(exc, CatgaError):
        if exc.node_id is None:
            exc.node_id = node_id
        return exc
    return RemoteHandlerError(
        f"{message.type_name} handler raised {type(exc).__name__}: {exc}",
        error_type=type(exc).__name__,
        node_id=node_id,
        retryable=bool(getattr(exc, "retryable", False)),
    )


class LocalDispatcher:
    """Runs this node's handlers through their pipelines, composed once at construction."""

    def __init__(
        self, registry: HandlerRegistry, behaviors: Sequence[PipelineBehavior], node_id: str
    ) -> None:
        self.registry = registry
        self.node_id = node_id
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

    def handles(self, message_type: type[Message]) -> bool:
        """Whether a handler for this type runs here."""
        return message_type in self.requests or message_type in self._events

    async def handle_request(self, message: Request[Any]) -> Any:
        """Run the command's or query's handler here.

        Raises:
            HandlerNotFoundError: no handler for it on this node.
            CatgaError: what the handler raised, other exceptions as `RemoteHandlerError`.
        """
        pipeline = self.requests.get(type(message))
        if pipeline is None:
            raise HandlerNotFoundError(f"no handler for {message.type_name} on node {self.node_id}")
        try:
            return await pipeline(message)
        except Exception as exc:
            raise handler_error(exc, message, self.node_id) from exc

    async def handle_event(self, event: Event) -> int:
        """Run every handler of the event here, one after another; returns how many failed.

        A failing handler is logged and does not stop the others.
        """
        failed = 0
        for name, pipeline in self._events.get(type(event), ()):
            try:
                await pipeline(event)
            except Exception:
                failed += 1
                logger.exception("event handler %s failed on %s %s", name, event.type_name, event.message_id)
        return failed
