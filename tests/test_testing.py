"""`fastapi_catga.testing`: what the README's "Testing your app" section promises."""

from __future__ import annotations

from example_app import orders
from example_app.orders import GetOrder, PlaceOrder
from fastapi_catga.testing import InMemoryTransport, memory_cluster
from tests.polling import eventually


async def test_orders_survive_a_node_crash() -> None:
    async with memory_cluster(3, handlers=[orders], heartbeat_interval=0.2, node_ttl=0.6) as nodes:
        await eventually(lambda: all(len(n.node.nodes()) == 3 for n in nodes), within=1)
        order = await nodes[0].mediator.send(PlaceOrder(sku="apple", quantity=1))
        crashed = nodes[1].node.transport
        assert isinstance(crashed, InMemoryTransport)
        crashed.crash()
        assert await nodes[0].mediator.send(GetOrder(order_id=order.order_id)) is not None
        await eventually(lambda: len(nodes[0].node.nodes()) == 2, within=2)
    assert all(isinstance(n.node.transport, InMemoryTransport) for n in nodes)
    assert all(n.node.transport.closed or n.node.transport.crashed for n in nodes)  # type: ignore[attr-defined]
