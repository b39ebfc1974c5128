"""Test helpers for apps built on fastapi-catga: whole clusters in one process, no broker.

async with memory_cluster(3, handlers=[orders]) as nodes:
    order = await nodes[0].mediator.send(PlaceOrder(sku="apple", quantity=1))
    nodes[2].node.transport.crash()          # kill -9 one node
    await nodes[0].mediator.send(GetOrder(order_id=order.order_id))   # fails over
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi_catga.bootstrap import Catga, build
from fastapi_catga.core.handlers import HandlerSource
from fastapi_catga.core.pipeline import PipelineBehavior
from fastapi_catga.settings import CatgaSettings
from fastapi_catga.transports.memory import InMemoryBroker, InMemoryTransport

__all__ = ["InMemoryBroker", "InMemoryTransport", "memory_cluster", "memory_node"]


def memory_node(
    broker: InMemoryBroker,
    *,
    handlers: Iterable[HandlerSource] | None = None,
    behaviors: Sequence[PipelineBehavior] = (),
    **settings: Any,
) -> Catga:
    """One node (not started) on ``broker``; ``settings`` are `CatgaSettings` fields."""
    config = CatgaSettings(transport="memory", **settings)
    transport = InMemoryTransport(broker, cluster=config.cluster, max_payload=config.max_payload)
    return build(config, handlers=handlers, behaviors=behaviors, transport=transport)


@asynccontextmanager
async def memory_cluster(
    size: int,
    *,
    handlers: Iterable[HandlerSource] | None = None,
    behaviors: Sequence[PipelineBehavior] = (),
    broker: InMemoryBroker | None = None,
    **settings: Any,
) -> AsyncIterator[list[Catga]]:
    """Start ``size`` nodes on one in-memory broker; stop the ones still running on exit."""
    broker = broker or InMemoryBroker()
    handler_list = None if handlers is None else list(handlers)
    nodes = [memory_node(broker, handlers=handler_list, behaviors=behaviors, **settings) for _ in range(size)]
    started: list[Catga] = []
    try:
        for node in nodes:
            await node.start()
            started.append(node)
        yield nodes
    finally:
        for node in reversed(started):
            transport = node.node.transport
            if isinstance(transport, InMemoryTransport) and not (transport.closed or transport.crashed):
                await node.stop()
