"""The orders domain: messages, their handlers and one custom behavior."""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Annotated, Any

from pydantic import BaseModel, Field

from fastapi_catga import CallNext, Command, Event, Message, Query, handler, new_message_id

logger = logging.getLogger(__name__)


class Order(BaseModel):
    order_id: str
    sku: str
    quantity: int
    status: str = "placed"


#: What a client may use as an order id: it routes the order, and it must read back.
OrderId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]


class PlaceOrder(Command[Order]):
    """Place an order. Its id routes it: the same order always lands on the same node."""

    order_id: OrderId = Field(default_factory=new_message_id)
    sku: str = Field(min_length=1, max_length=64)
    quantity: int = Field(gt=0, le=1000)

    def routing_key(self) -> str:
        return self.order_id


class GetOrder(Query[Order | None]):
    order_id: OrderId

    def routing_key(self) -> str:
        return self.order_id


class GetStats(Query[dict[str, int]]):
    """How many messages of each type this node handled (sent to every node by broadcast)."""


class OrderPlaced(Event):
    order_id: str
    sku: str
    quantity: int


# Per-node state. A real service keeps orders in a database; this one keeps them in memory, and
# routes every message about one order to one node (see routing_key) so the cluster stays consistent.
orders: dict[str, Order] = {}
stock_reserved: Counter[str] = Counter()
notifications: list[str] = []
handled: Counter[str] = Counter()


@handler
async def place_order(command: PlaceOrder) -> Order:
    order = Order(order_id=command.order_id, sku=command.sku, quantity=command.quantity)
    orders[order.order_id] = order
    return order


@handler
async def get_order(query: GetOrder) -> Order | None:
    return orders.get(query.order_id)


@handler
async def get_stats(query: GetStats) -> dict[str, int]:
    return dict(handled)


@handler
async def reserve_stock(event: OrderPlaced) -> None:
    """Inventory's concern: set stock aside."""
    stock_reserved[event.sku] += event.quantity


@handler
async def notify_customer(event: OrderPlaced) -> None:
    """Notifications' concern: tell the customer."""
    notifications.append(f"order {event.order_id}: {event.quantity} x {event.sku} confirmed")


class CountAndTime:
    """A custom pipeline behavior: counts handled messages per type and logs slow ones."""

    def __init__(self, slow_ms: float = 100.0) -> None:
        self._slow_ms = slow_ms

    async def __call__(self, message: Message, call_next: CallNext) -> Any:
        started = time.perf_counter()
        try:
            return await call_next()
        finally:
            handled[message.type_name] += 1
            elapsed_ms = (time.perf_counter() - started) * 1e3
            if elapsed_ms > self._slow_ms:
                logger.warning("%s took %.0f ms", message.type_name, elapsed_ms)
