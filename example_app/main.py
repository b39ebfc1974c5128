"""The app: ``uvicorn example_app.main:app`` (in-memory transport; ``CATGA_TRANSPORT=nats`` for a cluster;
``ORDERS_OBSERVE=1`` for traces, metrics and the live cluster page)."""

from __future__ import annotations

import logging

from fastapi import Depends, FastAPI, HTTPException

from example_app import observability, orders
from example_app.orders import GetOrder, GetStats, Order, OrderId, OrderPlaced, PlaceOrder
from fastapi_catga import CatgaError, LoggingBehavior, Mediator, catga_lifespan, catga_router, get_mediator

logger = logging.getLogger(__name__)

app = FastAPI(
    title="Orders",
    lifespan=catga_lifespan(
        handlers=[orders],
        behaviors=[LoggingBehavior(), orders.CountAndTime()],
        observers=observability.observers(),  # none unless ORDERS_OBSERVE=1 (docs/observability.md)
    ),
)


@app.post("/orders", status_code=201)
async def place_order(command: PlaceOrder, mediator: Mediator = Depends(get_mediator)) -> Order:
    order = await mediator.send(command)
    try:
        await mediator.publish(OrderPlaced(order_id=order.order_id, sku=order.sku, quantity=order.quantity))
    except CatgaError:
        # The order stands: answering with an error would tell the client it was not placed, and a
        # retry under a new id would place it twice. (A durable event would be stored, or refused,
        # before the order: see "Durable delivery" in the README.)
        logger.warning(
            "order %s placed; its OrderPlaced event may not have been published",
            order.order_id,
            exc_info=True,
        )
    return order


@app.get("/orders/{order_id}")
async def get_order(order_id: OrderId, mediator: Mediator = Depends(get_mediator)) -> Order:
    order = await mediator.send(GetOrder(order_id=order_id))
    if order is None:
        raise HTTPException(404, f"no order {order_id}")
    return order


@app.get("/stats")
async def stats(mediator: Mediator = Depends(get_mediator)) -> dict[str, dict[str, int] | str]:
    """Every node's message counts, gathered with one broadcast."""
    answers = await mediator.broadcast(GetStats())
    return {node: str(a) if isinstance(a, CatgaError) else a for node, a in answers.items()}


# After the app's own routes: FastAPI tries routes in order, and each one it passes costs (~10 µs a
# route on a small box, per request).
app.include_router(catga_router)
observability.instrument(app)  # ORDERS_OBSERVE=1: a trace per HTTP request, GET /catga/dashboard
