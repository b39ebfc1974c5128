"""The app most web tests run: `catga_lifespan` on a private in-memory broker, `catga_router`, one route."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from fastapi_catga import CatgaSettings, MediatorDep, catga_lifespan, catga_router
from fastapi_catga.testing import InMemoryTransport
from tests.core.handlers_sample import SampleDouble


def catga_app(**options: Any) -> FastAPI:
    """``options`` go to `catga_lifespan`; node ``web-node`` runs tests.core.handlers_sample by default."""
    options.setdefault("settings", CatgaSettings(node_id="web-node"))
    options.setdefault("handlers", ["tests.core.handlers_sample"])
    options.setdefault("transport", InMemoryTransport())
    app = FastAPI(lifespan=catga_lifespan(**options))
    app.include_router(catga_router)

    @app.get("/double/{value}")
    async def double(value: int, mediator: MediatorDep) -> int:
        return await mediator.send(SampleDouble(value=value))

    return app
