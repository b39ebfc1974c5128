"""One app in two versions, for the rolling-upgrade test: ``UPGRADE_SCHEMA`` picks the version of
its `Greet` command (``v1``, ``v2-optional``: an added field with a default, ``v2-required``: an
added required field); ``UPGRADE_HANDLES=0`` makes a node that only sends it."""

from __future__ import annotations

import os
from typing import Any, ClassVar

from fastapi import FastAPI

from fastapi_catga import Command, MediatorDep, catga_lifespan, catga_router, handler

NODE = os.environ.get("CATGA_NODE_ID", "?")


class GreetV1(Command[str]):
    type_name: ClassVar[str] = "Greet"
    name: str


class GreetOptional(Command[str]):
    type_name: ClassVar[str] = "Greet"
    name: str
    greeting: str = "hello"


class GreetRequired(Command[str]):
    type_name: ClassVar[str] = "Greet"
    name: str
    title: str


@handler
async def greet_v1(command: GreetV1) -> str:
    return NODE


@handler
async def greet_optional(command: GreetOptional) -> str:
    return NODE


@handler
async def greet_required(command: GreetRequired) -> str:
    return NODE


VERSIONS: dict[str, tuple[type[Command[str]], Any]] = {
    "v1": (GreetV1, greet_v1),
    "v2-optional": (GreetOptional, greet_optional),
    "v2-required": (GreetRequired, greet_required),
}
GREET, GREET_HANDLER = VERSIONS[os.environ.get("UPGRADE_SCHEMA", "v1")]
HANDLERS = [GREET_HANDLER] if os.environ.get("UPGRADE_HANDLES", "1") == "1" else []

app = FastAPI(lifespan=catga_lifespan(handlers=HANDLERS))
app.include_router(catga_router)


@app.post("/greet")
async def greet(mediator: MediatorDep) -> dict[str, str]:
    # Every version's fields: each version's class keeps the ones it knows.
    return {"node": await mediator.send(GREET.model_validate({"name": "Ada", "title": "Dr"}))}
