"""bench_http's baseline: the example app's ``POST /orders``, hand-rolled on raw nats-py.

    BENCH_NATS_URL=nats://... uvicorn benchmarks._http_raw:app

The same route body and answer as ``example_app.main`` (a `PlaceOrder`-shaped JSON in, the `Order`
out, 201), with what catga does in between written by hand: ``nc.request`` to a queue group that
every process of this app joins (so, with two processes, about half the orders are answered by
the other one, as catga's routing spreads them over two nodes), then a plain ``nc.publish`` of
the ``OrderPlaced`` event to every process, whose handlers do the example's bookkeeping.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import nats
from fastapi import FastAPI, Request
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from pydantic import BaseModel, Field

from example_app.orders import Order, OrderId
from fastapi_catga import new_message_id

ORDERS_SUBJECT = "bench.http.orders"
PLACED_SUBJECT = "bench.http.placed"


class PlaceOrder(BaseModel):
    order_id: OrderId = Field(default_factory=new_message_id)
    sku: str = Field(min_length=1, max_length=64)
    quantity: int = Field(gt=0, le=1000)


class OrderPlaced(BaseModel):
    order_id: str
    sku: str
    quantity: int


orders: dict[str, Order] = {}
stock_reserved: Counter[str] = Counter()


async def on_place(msg: Msg) -> None:
    command = PlaceOrder.model_validate_json(msg.data)
    order = Order(order_id=command.order_id, sku=command.sku, quantity=command.quantity)
    orders[order.order_id] = order
    await msg.respond(order.model_dump_json().encode())


async def on_placed(msg: Msg) -> None:
    event = OrderPlaced.model_validate_json(msg.data)
    stock_reserved[event.sku] += event.quantity


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    nc = await nats.connect(os.environ["BENCH_NATS_URL"])
    await nc.subscribe(ORDERS_SUBJECT, queue="orders", cb=on_place)
    await nc.subscribe(PLACED_SUBJECT, cb=on_placed)
    await nc.flush()
    app.state.nc = nc
    try:
        yield
    finally:
        await nc.close()


app = FastAPI(lifespan=lifespan)


@app.post("/orders", status_code=201)
async def place_order(command: PlaceOrder, request: Request) -> Order:
    nc: NatsClient = request.app.state.nc
    reply = await nc.request(ORDERS_SUBJECT, command.model_dump_json().encode(), timeout=10)
    order = Order.model_validate_json(reply.data)
    placed = OrderPlaced(order_id=order.order_id, sku=order.sku, quantity=order.quantity)
    await nc.publish(PLACED_SUBJECT, placed.model_dump_json().encode())
    return order
