from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from fastapi_catga import CallNext, Catga, Message
from fastapi_catga.testing import InMemoryBroker, InMemoryTransport, memory_node
from tests.cluster import workload

FAST = {"heartbeat_interval": 0.2, "node_ttl": 0.6, "request_timeout": 2.0}

StartNode = Callable[..., Awaitable[Catga]]


class NodeTag:
    """Tells the workload's handlers which node runs them."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id

    async def __call__(self, message: Message, call_next: CallNext) -> Any:
        token = workload.current_node.set(self.node_id)
        try:
            return await call_next()
        finally:
            workload.current_node.reset(token)


@pytest.fixture(autouse=True)
def fresh_workload() -> None:
    workload.executions.clear()
    workload.events_seen.clear()


@pytest.fixture
def broker() -> InMemoryBroker:
    return InMemoryBroker()


@pytest.fixture
async def start_node(broker: InMemoryBroker) -> AsyncIterator[StartNode]:
    """Start a node named ``name`` on the shared broker; every node still up is stopped after."""
    nodes: list[Catga] = []

    async def start(name: str, handlers: list[Any] | None = None, **settings: Any) -> Catga:
        node = memory_node(
            broker,
            handlers=[workload] if handlers is None else handlers,
            behaviors=[NodeTag(name)],
            node_id=name,
            **{**FAST, **settings},
        )
        await node.start()
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        transport = node.node.transport
        assert isinstance(transport, InMemoryTransport)
        if not (transport.closed or transport.crashed):
            transport.resume()
            await node.stop()


def ids(nodes: list[Any]) -> set[str]:
    return {n.node_id for n in nodes}
