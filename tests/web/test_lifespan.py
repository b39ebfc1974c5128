"""`catga_lifespan`: bare or configured, around a user lifespan, and its problem+json handler."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from fastapi_catga import (
    CatgaError,
    HandlerNotFoundError,
    Mediator,
    MediatorDep,
    catga_lifespan,
    catga_router,
    get_mediator,
)
from fastapi_catga.testing import InMemoryTransport
from tests.core.handlers_sample import SampleDouble
from tests.web.apps import catga_app


def test_bare_catga_lifespan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CATGA_HANDLER_MODULES", "tests.core.handlers_sample")
    monkeypatch.setenv("CATGA_NODE_ID", "bare-node")
    monkeypatch.setenv("CATGA_METADATA", '{"zone": "eu-1"}')
    app = FastAPI(lifespan=catga_lifespan)
    app.include_router(catga_router)

    @app.get("/double/{value}")
    async def double(value: int, mediator: Mediator = Depends(get_mediator)) -> int:
        return await mediator.send(SampleDouble(value=value))

    with TestClient(app) as client:
        assert client.get("/double/21").json() == 42
        current = client.get("/catga/nodes/current").json()
    assert current["node_id"] == "bare-node"
    assert current["metadata"] == {"zone": "eu-1"}
    assert current["handles"] == ["SampleDouble", "SampleUpper"]


class RecordingTransport(InMemoryTransport):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    async def connect(self) -> None:
        await super().connect()
        self.log.append("transport:connect")

    async def aclose(self) -> None:
        self.log.append("transport:close")
        await super().aclose()


def test_user_lifespan_runs_inside_and_keeps_its_state() -> None:
    log: list[str] = []

    @asynccontextmanager
    async def user_lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        log.append("user:start")
        yield {"db": "connected"}
        log.append("user:stop")

    app = catga_app(lifespan=user_lifespan, transport=RecordingTransport(log))

    @app.get("/state")
    async def state(request: Request, mediator: MediatorDep) -> dict[str, Any]:
        return {"db": request.state.db, "double": await mediator.send(SampleDouble(value=4))}

    with TestClient(app) as client:
        assert log == ["transport:connect", "user:start"]
        assert client.get("/state").json() == {"db": "connected", "double": 8}
    assert log == ["transport:connect", "user:start", "user:stop", "transport:close"]


def test_user_lifespan_failing_at_startup_stops_the_node() -> None:
    log: list[str] = []

    @asynccontextmanager
    async def user_lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.append("user:start")
        raise RuntimeError("database unreachable")
        yield

    app = catga_app(lifespan=user_lifespan, transport=RecordingTransport(log))
    with pytest.raises(RuntimeError, match="database unreachable"), TestClient(app):
        pass
    assert log == ["transport:connect", "user:start", "transport:close"]


def test_user_lifespan_yielding_nothing() -> None:
    started: list[bool] = []

    @asynccontextmanager
    async def user_lifespan(app: FastAPI) -> AsyncIterator[None]:
        started.append(True)
        yield

    with TestClient(catga_app(lifespan=user_lifespan)) as client:
        assert client.get("/double/5").json() == 10
    assert started == [True]


def test_the_apps_own_catga_error_handler_is_kept() -> None:
    app = catga_app()

    async def teapot(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"mine": str(exc)}, status_code=418)

    app.add_exception_handler(CatgaError, teapot)

    @app.get("/missing")
    async def missing() -> None:
        raise HandlerNotFoundError("no handler for X")

    with TestClient(app) as client:
        response = client.get("/missing")
    assert (response.status_code, response.json()) == (418, {"mine": "no handler for X"})
