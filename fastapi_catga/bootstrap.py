"""The composition root: settings -> transport -> dispatcher -> cluster node -> mediator."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from fastapi_catga._version import __version__
from fastapi_catga.cluster.node import ClusterNode
from fastapi_catga.core.behaviors import IdempotencyBehavior
from fastapi_catga.core.dispatch import LocalDispatcher
from fastapi_catga.core.handlers import HandlerRegistry, HandlerSource
from fastapi_catga.core.mediator import Mediator
from fastapi_catga.core.observe import Observer, combine
from fastapi_catga.core.pipeline import PipelineBehavior
from fastapi_catga.exceptions import ConfigurationError
from fastapi_catga.settings import CatgaSettings, load_settings
from fastapi_catga.transports import Transport, create_transport

__all__ = ["Catga", "build"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Catga:
    """One running node: start it, use its mediator, stop it."""

    settings: CatgaSettings
    node: ClusterNode
    mediator: Mediator
    #: The observers `build` installed, in order.
    observers: tuple[Observer, ...] = ()

    async def start(self) -> None:
        """Connect, subscribe the handlers and join the cluster (the view is complete after)."""
        await self.node.start()
        logger.info(
            "catga node %s up on %s (cluster %r): handles %s",
            self.node.node_id,
            self.node.transport.name,
            self.settings.cluster,
            ", ".join(self.node.view.self_info.handles + self.node.view.self_info.events) or "nothing",
        )

    async def stop(self) -> None:
        """Leave the cluster, drain work in flight, close the connection."""
        await self.node.stop()


def build(
    settings: CatgaSettings | None = None,
    *,
    handlers: Iterable[HandlerSource] | None = None,
    behaviors: Sequence[PipelineBehavior] = (),
    transport: Transport | None = None,
    observers: Iterable[Observer] = (),
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> Catga:
    """Wire a node from its parts.

    Args:
        settings: defaults to `CatgaSettings` read from ``CATGA_*`` variables.
        handlers: modules (or dotted names, or functions) whose ``@handler``s this node runs;
            defaults to ``CATGA_HANDLER_MODULES`` when set, else every ``@handler`` imported so far.
        behaviors: pipeline behaviors, outermost first, wrapped around every handler.
        transport: a transport instance (an `InMemoryTransport` on a shared broker, in tests);
            defaults to the one ``CATGA_TRANSPORT`` names.
        observers: told about sends, handler runs, membership and the broker connection
            (`fastapi_catga.otel.TracingObserver`, `fastapi_catga.prometheus.PrometheusObserver`);
            none by default, at no cost.
        clock: monotonic seconds for membership and deadlines (a virtual clock, in simulations).
        wall_clock: UNIX seconds for the deadlines that travel between nodes.

    Raises:
        ConfigurationError: ``IdempotencyBehavior`` listed more than once (a second one would
            wait for the first one's run, and every send would hang).
    """
    settings = settings or load_settings()
    if handlers is None and settings.handler_modules:
        handlers = settings.handler_modules
    elif settings.handler_modules:
        logger.warning(
            "CATGA_HANDLER_MODULES (%s) is ignored: the app passes handlers= itself",
            ",".join(settings.handler_modules),
        )
    idempotent = sum(isinstance(behavior, IdempotencyBehavior) for behavior in behaviors)
    if idempotent > 1:  # the inner one would wait for the outer one's run: every send would hang
        raise ConfigurationError(
            f"IdempotencyBehavior is listed {idempotent} times in behaviors=; list it once"
        )
    registry = HandlerRegistry.from_declared() if handlers is None else HandlerRegistry.from_sources(handlers)
    dispatcher = LocalDispatcher(
        registry, behaviors, settings.node_id, expose_errors=settings.expose_errors, clock=clock
    )
    transport = transport or create_transport(settings)
    observers = tuple(observers)
    node = ClusterNode(
        transport,
        dispatcher,
        settings,
        version=__version__,
        clock=clock,
        wall_clock=wall_clock,
        observer=combine(observers),
    )
    for behavior in behaviors:
        if isinstance(behavior, IdempotencyBehavior):
            behavior.share(node.durable.records, settings.node_id)
    return Catga(settings, node, Mediator(dispatcher, node), observers)
