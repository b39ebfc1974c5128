"""`fastapi_catga.testing`: what the README's "Testing your app" section promises."""

from __future__ import annotations

from example_app import orders
from example_app.orders import PlaceOrder
from fastapi_catga.cluster.routing import by_key
from fastapi_catga.testing import InMemoryTransport, memory_cluster
from tests.polling import eventually


async def test_sends_fail_over_when_a_node_crashes() -> None:
    async with memory_cluster(3, handlers=[orders], heartbeat_interval=0.2, node_ttl=0.6) as nodes:
        await eventually(lambda: all(len(n.node.nodes()) == 3 for n in nodes), within=1)
        crashed, crashed_id = nodes[1].node.transport, nodes[1].node.node_id
        assert isinstance(crashed, InMemoryTransport)
        crashed.crash()
        ids = [f"o-{n}" for n in range(30)]
        members = nodes[0].node.nodes()
        assert any(by_key(members, i).node_id == crashed_id for i in ids), (
            "some orders must try the crashed node"
        )
        for order_id in ids:  # the README's test
            order = await nodes[0].mediator.send(PlaceOrder(order_id=order_id, sku="apple", quantity=1))
            assert order.order_id == order_id
        await eventually(lambda: len(nodes[0].node.nodes()) == 2, within=2)
    assert all(isinstance(n.node.transport, InMemoryTransport) for n in nodes)
    assert all(n.node.transport.closed or n.node.transport.crashed for n in nodes)  # type: ignore[attr-defined]
