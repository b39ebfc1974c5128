"""The app the multi-process tests run, one uvicorn process per node (settings from CATGA_*)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from fastapi import FastAPI

from fastapi_catga import CatgaError, Command, Event, MediatorDep, catga_lifespan, catga_router, handler

NODE = os.environ.get("CATGA_NODE_ID", "?")
executions: dict[str, list[float]] = {}  # message id -> wall-clock start of each run on this node
events: list[str] = []


class Work(Command[str]):
    delay: float = 0.0


class Ping(Event):
    pass


@handler
async def work(command: Work) -> str:
    executions.setdefault(command.message_id, []).append(time.time())
    if command.delay:
        await asyncio.sleep(command.delay)
    return NODE


@handler
async def ping(event: Ping) -> None:
    events.append(event.message_id)


app = FastAPI(lifespan=catga_lifespan(handlers=[work, ping]))
app.include_router(catga_router)


@app.post("/work")
async def send_work(mediator: MediatorDep, delay: float = 0.0) -> dict[str, str]:
    command = Work(delay=delay)
    return {"node": await mediator.send(command), "message_id": command.message_id}


@app.post("/work/{node_id}")
async def send_work_to(node_id: str, mediator: MediatorDep, delay: float = 0.0) -> dict[str, str]:
    return {"node": await mediator.send_to_node(Work(delay=delay), node_id)}


@app.post("/broadcast")
async def broadcast(mediator: MediatorDep) -> dict[str, str]:
    answers = await mediator.broadcast(Work())
    return {node: f"error: {a}" if isinstance(a, CatgaError) else a for node, a in answers.items()}


@app.post("/publish")
async def publish(mediator: MediatorDep) -> dict[str, str]:
    event = Ping()
    await mediator.publish(event)
    return {"message_id": event.message_id}


@app.get("/_test/executions")
async def get_executions() -> dict[str, Any]:
    return {"executions": executions, "events": events}
