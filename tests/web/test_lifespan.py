"""`catga_lifespan`: bare or configured, around a user lifespan, and its problem+json handler."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fastapi import Depends, FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from starlette.routing import Mount

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

    with TestClient(app) as client:  # the app's resources outlive the node
        assert log == ["user:start", "transport:connect"]
        assert client.get("/state").json() == {"db": "connected", "double": 8}
    assert log == ["user:start", "transport:connect", "transport:close", "user:stop"]


def test_a_user_lifespan_passed_as_the_app_is_refused_at_once() -> None:
    @asynccontextmanager
    async def user_lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield

    with pytest.raises(TypeError, match=r"catga_lifespan\(lifespan=\.\.\.\)"):
        catga_lifespan(user_lifespan, handlers=[])  # type: ignore[call-overload]


def test_user_lifespan_failing_at_startup_starts_no_node() -> None:
    log: list[str] = []

    @asynccontextmanager
    async def user_lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.append("user:start")
        raise RuntimeError("database unreachable")
        yield

    app = catga_app(lifespan=user_lifespan, transport=RecordingTransport(log))
    with pytest.raises(RuntimeError, match="database unreachable"), TestClient(app):
        pass
    assert log == ["user:start"], "no node started for an app whose own start-up failed"


def test_user_lifespan_yielding_nothing() -> None:
    started: list[bool] = []

    @asynccontextmanager
    async def user_lifespan(app: FastAPI) -> AsyncIterator[None]:
        started.append(True)
        yield

    with TestClient(catga_app(lifespan=user_lifespan)) as client:
        assert client.get("/double/5").json() == 10
    assert started == [True]


def test_a_bare_async_generator_lifespan_runs_as_starlette_runs_one() -> None:
    log: list[str] = []

    async def user_lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:  # no @asynccontextmanager
        log.append("user:start")
        yield {"db": "connected"}
        log.append("user:stop")

    app = catga_app(lifespan=user_lifespan)

    @app.get("/db")
    async def db(request: Request) -> str:
        return str(request.state.db)

    with TestClient(app) as client:
        assert client.get("/db").json() == "connected"
        assert client.get("/double/5").json() == 10
    assert log == ["user:start", "user:stop"]


def test_a_lifespan_that_is_no_function_is_refused_at_once() -> None:
    with pytest.raises(TypeError, match="lifespan= takes the app's lifespan function, got 42"):
        catga_lifespan(lifespan=42, handlers=[])  # type: ignore[call-overload]


def test_a_lifespan_that_yields_no_mapping_is_a_clear_error() -> None:
    @asynccontextmanager
    async def user_lifespan(app: FastAPI) -> AsyncIterator[Any]:
        yield ["not", "a", "mapping"]

    with (
        pytest.raises(TypeError, match="a lifespan yields a mapping"),
        TestClient(catga_app(lifespan=user_lifespan)),
    ):
        pass


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


class Counted:
    """A pure ASGI middleware that counts how often the app makes it, and what it serves."""

    made = 0

    def __init__(self, app: Any) -> None:
        Counted.made += 1
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


def test_the_apps_own_middleware_is_made_once_and_errors_still_become_problems() -> None:
    """The problem+json handler goes into the stack Starlette built: making the stack again would
    make the app's middleware again (a metrics middleware registering its counters twice fails)."""
    Counted.made = 0
    app = catga_app()
    app.add_middleware(Counted)

    @app.get("/unhandled")
    async def unhandled(mediator: MediatorDep) -> None:
        raise HandlerNotFoundError("nobody")

    with TestClient(app) as client:
        answer = client.get("/unhandled")
        assert (answer.status_code, answer.headers["content-type"]) == (404, "application/problem+json")
        assert client.get("/double/2").json() == 4
    assert Counted.made == 1


def test_a_mounted_app_answers_catga_errors_as_problems_too() -> None:
    app, sub = catga_app(), FastAPI()

    @sub.get("/unhandled")
    async def unhandled(mediator: MediatorDep) -> None:
        raise HandlerNotFoundError("nobody here")

    app.mount("/sub", sub)
    app.router.routes.append(Mount("/group", routes=[Mount("/inner", app=sub)]))  # under a plain router
    with TestClient(app) as client:
        for path in ("/sub/unhandled", "/group/inner/unhandled"):
            answer = client.get(path)
            assert (answer.status_code, answer.json()["detail"]) == (404, "nobody here"), path


def test_a_websocket_route_gets_the_mediator() -> None:
    app = catga_app()

    @app.websocket("/ws")
    async def doubled(socket: WebSocket, mediator: MediatorDep) -> None:
        await socket.accept()
        await socket.send_json(await mediator.send(SampleDouble(value=int(await socket.receive_text()))))
        await socket.close()

    with TestClient(app) as client, client.websocket_connect("/ws") as socket:
        socket.send_text("4")
        assert socket.receive_json() == 8


def test_an_app_with_a_given_memory_transport_starts_again_for_each_client() -> None:
    """A module-level app in tests: each `with TestClient(app)` runs its lifespan anew."""
    app = catga_app()
    for _ in range(3):
        with TestClient(app) as client:
            assert client.get("/double/3").json() == 6


def test_the_apps_own_state_keys_are_its_own_and_a_stopped_node_is_not_running() -> None:
    @asynccontextmanager
    async def own(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        yield {"catga": "the app's own"}

    app = catga_app(lifespan=own)

    @app.get("/own")
    async def own_state(request: Request) -> str:
        return str(request.state.catga)

    with TestClient(app) as client:
        assert client.get("/own").json() == "the app's own"
        assert client.get("/double/5").json() == 10
    assert not hasattr(app.state, "fastapi_catga"), "the app still holds the stopped node"
    answer = TestClient(app).get("/double/5")  # no lifespan this time
    assert answer.status_code == 500 and "not running in this app" in answer.json()["detail"]
