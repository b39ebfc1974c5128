"""The app of the multi-process promise tests: handlers that fail in every way a user's can."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter

from fastapi import FastAPI

from fastapi_catga import (
    CatgaError,
    Command,
    MediatorDep,
    RequestTimeoutError,
    TransportError,
    catga_lifespan,
    catga_router,
    handler,
)

NODE = os.environ.get("CATGA_NODE_ID", "?")
runs: Counter[str] = Counter()  # message id -> runs on this node


class OutOfStock(CatgaError):
    def __init__(self, sku: str) -> None:
        super().__init__(f"no {sku} left", details={"sku": sku})


class Fail(Command[str]):
    kind: str


class Keyed(Command[str]):
    key: str

    def routing_key(self) -> str:
        return self.key


class Big(Command[str]):
    blob: str


@handler
async def fail(command: Fail) -> str:
    runs[command.message_id] += 1
    if command.kind == "transport":
        raise TransportError("the downstream broker blipped")
    if command.kind == "timeout":
        raise RequestTimeoutError("the downstream call timed out")
    if command.kind == "cancelled":  # its own, not its task's: something it awaited was cancelled
        raise asyncio.CancelledError
    if command.kind == "huge":  # over the broker's limit as it is: its reply is cut to fit
        raise CatgaError("x" * 2_000_000, details={"rows": list(range(100_000))})
    if command.kind == "long-name":  # a generated class: its name too is cut to fit
        raise type("E" * 2_000_000, (Exception,), {})()
    if command.kind == "exit":  # sys.exit() in a library the handler calls: the node serves on
        sys.exit(3)
    if command.kind == "interrupt":
        raise KeyboardInterrupt
    raise OutOfStock("apple")


@handler
async def keyed(command: Keyed) -> str:
    return NODE


@handler
async def big(command: Big) -> str:
    return NODE


class Sized(Command[str]):
    size: int


@handler
async def sized(command: Sized) -> str:
    return "x" * command.size


app = FastAPI(lifespan=catga_lifespan(handlers=[fail, keyed, big, sized]))
app.include_router(catga_router)


@app.post("/fail/{kind}")
async def send_fail(kind: str, mediator: MediatorDep, node: str | None = None) -> dict[str, object]:
    command, started = Fail(kind=kind), time.monotonic()
    try:
        await (mediator.send(command) if node is None else mediator.send_to_node(command, node))
    except OutOfStock as exc:  # the user's own class, wherever the handler ran
        return {"caught": "OutOfStock", "node": exc.node_id, "details": exc.details, "id": command.message_id}
    except CatgaError as exc:
        kind_caught = type(exc).__name__
        return {
            "caught": kind_caught,
            "node": exc.node_id,
            "id": command.message_id,
            "elapsed": time.monotonic() - started,
        }
    return {"caught": None}


@app.post("/keyed/{key}")
async def send_keyed(key: str, mediator: MediatorDep, timeout: float | None = None) -> str:
    return await mediator.send(Keyed(key=key), timeout=timeout)


@app.post("/big")
async def send_big(mediator: MediatorDep, size: int) -> str:
    return await mediator.send(Big(blob="x" * size))


@app.post("/sized/{size}")
async def send_sized(size: int, mediator: MediatorDep, node: str) -> str:
    return await mediator.send_to_node(Sized(size=size), node)


@app.get("/_test/runs")
async def get_runs() -> dict[str, int]:
    return dict(runs)
