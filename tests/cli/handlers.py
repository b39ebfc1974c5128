"""What the CLI tests' nodes run: a query, failing commands, an event and a durable command."""

from __future__ import annotations

import contextvars
from typing import Any, ClassVar

from fastapi_catga import CallNext, CatgaError, Command, Durable, Event, Message, Query, Reject, handler

node: contextvars.ContextVar[str] = contextvars.ContextVar("node", default="?")
rejecting: set[str] = set()  # Charge message ids whose handler rejects them (dead-letters them at once)
charged: list[str] = []  # Charge message ids that ran to success


class Greet(Query[str]):
    name: str


class Explode(Command[int]):
    """Its handler raises a plain exception: the caller gets a RemoteHandlerError."""


class OutOfStock(CatgaError):
    code = "out_of_stock"


class Reserve(Command[int]):
    sku: str


class Noted(Event):
    text: str = ""


class Charge(Command[str]):
    durable: ClassVar[Durable | bool] = Durable(attempts=2, backoff=(0.2,), lease=5, dedup_window=60)
    amount: int


@handler
async def greet(query: Greet) -> str:
    return f"hello {query.name} from {node.get()}"


@handler
async def explode(command: Explode) -> int:
    raise ValueError("the handler's own text, which stays in its node's log")


@handler
async def reserve(command: Reserve) -> int:
    raise OutOfStock(f"no {command.sku} left", details={"sku": command.sku, "left": 0})


@handler
async def noted(event: Noted) -> None:
    pass


@handler
async def charge(command: Charge) -> str:
    if command.message_id in rejecting:
        raise Reject("the card was declined")
    charged.append(command.message_id)
    return f"charged {command.amount}"


class NodeTag:
    """Tells the handlers which node runs them."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id

    async def __call__(self, message: Message, call_next: CallNext) -> Any:
        token = node.set(self.node_id)
        try:
            return await call_next()
        finally:
            node.reset(token)
