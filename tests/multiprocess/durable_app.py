"""The app of the multi-process durable tests. Every handler run is written to a ledger file shared
by all nodes (``CATGA_TEST_LEDGER``), so runs on a node that was killed are still counted."""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any, ClassVar

from fastapi import FastAPI

from fastapi_catga import (
    Command,
    Durable,
    Event,
    MediatorDep,
    catga_admin_router,
    catga_lifespan,
    catga_router,
    handler,
)

NODE = os.environ.get("CATGA_NODE_ID", "?")
LEDGER = os.environ.get("CATGA_TEST_LEDGER", "/dev/null")
TIMING = Durable(attempts=3, backoff=(0.5, 1.0), lease=1.5, dedup_window=60)
poisoned = {"on": os.environ.get("CATGA_TEST_POISON", "") == "1"}


def note(kind: str, message_id: str, **extra: Any) -> None:
    line = json.dumps({"kind": kind, "id": message_id, "node": NODE, "at": time.time(), **extra})
    fd = os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


class Job(Command[str]):
    durable: ClassVar[Durable | bool] = TIMING
    work: float = 0.0
    poison: bool = False


class Shipped(Event):
    durable: ClassVar[Durable | bool] = TIMING
    order: str


class ShortLived(Command[str]):
    durable: ClassVar[Durable | bool] = Durable(attempts=3, backoff=(0.5,), lease=1.5, dedup_window=2)


@handler
async def run_job(job: Job) -> str:
    note("start", job.message_id)
    if job.work:
        await asyncio.sleep(job.work)
    if job.poison and poisoned["on"]:
        note("fail", job.message_id)
        raise ValueError("poisoned")
    note("end", job.message_id)
    return NODE


@handler
async def short_lived(command: ShortLived) -> str:
    note("end", command.message_id)
    return NODE


@handler
async def mail_on_shipped(event: Shipped) -> None:
    note("mail", event.message_id)


@handler
async def stock_on_shipped(event: Shipped) -> None:
    note("stock", event.message_id)


handlers: list[Any] = [run_job, short_lived, mail_on_shipped]
if os.environ.get("CATGA_TEST_STOCK", "1") == "1":
    handlers.append(stock_on_shipped)
app = FastAPI(lifespan=catga_lifespan(handlers=handlers))
app.include_router(catga_router)
app.include_router(catga_admin_router)


@app.post("/jobs")
async def enqueue_job(mediator: MediatorDep, work: float = 0.0, poison: bool = False) -> dict[str, str]:
    accepted = await mediator.enqueue(Job(work=work, poison=poison))
    return {"message_id": accepted.message_id}


@app.post("/jobs/send")
async def send_job(
    mediator: MediatorDep, message_id: str, work: float = 0.0, timeout: float = 10
) -> dict[str, str]:
    return {"node": await mediator.send(Job(message_id=message_id, work=work), timeout=timeout)}


@app.post("/short/{message_id}")
async def send_short(message_id: str, mediator: MediatorDep) -> dict[str, str]:
    return {"node": await mediator.send(ShortLived(message_id=message_id))}


@app.post("/shipped/{order}")
async def publish_shipped(order: str, mediator: MediatorDep) -> dict[str, str]:
    event = Shipped(order=order)
    await mediator.publish(event)
    return {"message_id": event.message_id}


@app.post("/_test/poison/{on}")
async def set_poison(on: int) -> dict[str, bool]:
    poisoned["on"] = bool(on)
    return poisoned
