"""The app of the overload test: one slow command, and counters that stay the same size however
many run (the flooded node's memory is measured)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from fastapi import FastAPI

from fastapi_catga import Command, catga_lifespan, catga_router, handler

NODE = os.environ.get("CATGA_NODE_ID", "?")
counts = {"started": 0, "finished": 0}


class Slow(Command[str]):
    delay: float = 0.0
    pad: str = ""  # makes each request weigh what real ones do


@handler
async def slow(command: Slow) -> str:
    counts["started"] += 1
    await asyncio.sleep(command.delay)
    counts["finished"] += 1
    return NODE


app = FastAPI(lifespan=catga_lifespan(handlers=[slow]))
app.include_router(catga_router)


@app.get("/_test/counts")
async def get_counts() -> dict[str, Any]:
    return counts
