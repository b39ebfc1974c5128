"""Static types of the public API, pinned with ``assert_type`` (mypy checks this file) and run by pytest.

The ``# type: ignore[code]`` lines are negative checks: with ``warn_unused_ignores`` mypy fails
if the marked line stops being an error, e.g. if ``send`` degraded to returning ``Any``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, assert_type

import pytest
from fastapi import FastAPI

from example_app import orders
from example_app.orders import GetOrder, GetStats, Order, OrderPlaced, PlaceOrder
from fastapi_catga import (
    Catga,
    CatgaError,
    CatgaSettings,
    Mediator,
    MessageValidationError,
    NodeInfo,
    build,
    catga_lifespan,
)
from fastapi_catga.testing import InMemoryTransport


async def check_mediator_types(mediator: Mediator, node_id: str) -> None:
    """Every assert_type here is checked by mypy; the test below also runs it."""
    placed = await mediator.send(PlaceOrder(sku="typed", quantity=2))
    assert_type(placed, Order)
    assert isinstance(placed, Order)

    found = await mediator.send(GetOrder(order_id=placed.order_id), timeout=5)
    assert_type(found, Order | None)
    assert found == placed

    stats = await mediator.send(GetStats())
    assert_type(stats, dict[str, int])
    assert isinstance(stats, dict)

    direct = await mediator.send_to_node(GetOrder(order_id=placed.order_id), node_id, timeout=5)
    assert_type(direct, Order | None)
    assert direct == placed

    answers = await mediator.broadcast(PlaceOrder(sku="everywhere", quantity=1))
    assert_type(answers, dict[str, Order | CatgaError])
    assert isinstance(answers[node_id], Order)

    counts = await mediator.broadcast(GetStats(), timeout=5)
    assert_type(counts, dict[str, dict[str, int] | CatgaError])

    assert_type(await mediator.publish(OrderPlaced(order_id="o", sku="s", quantity=1)), None)
    assert_type(await mediator.get_nodes(), list[NodeInfo])
    assert_type(await mediator.get_current_node(), NodeInfo)

    wrong: str = await mediator.send(PlaceOrder(sku="typed", quantity=1))  # type: ignore[arg-type]
    assert isinstance(wrong, Order)


async def check_misuse_is_rejected(mediator: Mediator) -> None:
    with pytest.raises(MessageValidationError):
        await mediator.send(OrderPlaced(order_id="o", sku="s", quantity=1))  # type: ignore[arg-type]
    with pytest.raises(MessageValidationError):
        await mediator.publish(PlaceOrder(sku="s", quantity=1))  # type: ignore[arg-type]


def check_lifespan_types(settings: CatgaSettings) -> None:
    configured = catga_lifespan(settings=settings, handlers=[orders])
    assert_type(configured, Callable[[FastAPI], AbstractAsyncContextManager[dict[str, Any]]])
    FastAPI(lifespan=catga_lifespan)
    FastAPI(lifespan=configured)


async def check_handlers_stay_typed() -> None:
    assert_type(await orders.place_order(PlaceOrder(sku="a", quantity=1)), Order)
    assert_type(await orders.get_order(GetOrder(order_id="none")), Order | None)


@pytest.fixture
async def catga(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Catga]:
    for name in [name for name in os.environ if name.startswith("CATGA_")]:
        monkeypatch.delenv(name)  # settings come from the test, not the environment
    node = build(CatgaSettings(node_id="typed-node"), handlers=[orders], transport=InMemoryTransport())
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


async def test_types_hold_at_runtime(catga: Catga) -> None:
    await check_mediator_types(catga.mediator, catga.node.node_id)
    await check_misuse_is_rejected(catga.mediator)
    await check_handlers_stay_typed()
    check_lifespan_types(catga.settings)
