"""`get_mediator` and `MediatorDep`: the running node's mediator, or a message saying what is missing."""

from __future__ import annotations

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient

from fastapi_catga import (
    CatgaSettings,
    ConfigurationError,
    Mediator,
    MediatorDep,
    build,
    catga_lifespan,
    get_mediator,
)
from fastapi_catga.testing import InMemoryTransport
from tests.core import handlers_sample
from tests.core.handlers_sample import SampleDouble
from tests.web.apps import catga_app


def test_both_spellings_give_the_running_nodes_mediator() -> None:
    app = catga_app()

    @app.get("/same")
    async def same(request: Request, annotated: MediatorDep, plain: Mediator = Depends(get_mediator)) -> bool:
        return annotated is plain is request.app.state.fastapi_catga.mediator

    with TestClient(app) as client:
        assert client.get("/same").json() is True


def test_get_mediator_without_the_lifespan_says_what_to_do() -> None:
    app = FastAPI()

    @app.get("/")
    async def route(mediator: MediatorDep) -> str:
        return "unreachable"

    with (
        TestClient(app) as client,
        pytest.raises(ConfigurationError, match=r"FastAPI\(lifespan=catga_lifespan\)"),
    ):
        client.get("/")


def test_a_test_client_that_never_ran_the_lifespan_is_told_to_enter_it() -> None:
    app = FastAPI(lifespan=catga_lifespan(transport=InMemoryTransport()))

    @app.get("/")
    async def route(mediator: MediatorDep) -> str:
        return "unreachable"

    client = TestClient(app)  # not entered: Starlette runs no lifespan
    with pytest.raises(ConfigurationError, match=r"with TestClient\(app\) as client:"):
        client.get("/")


def test_get_mediator_can_be_overridden() -> None:
    catga = build(
        CatgaSettings(node_id="override"), handlers=[handlers_sample.double], transport=InMemoryTransport()
    )
    app = FastAPI()

    @app.get("/double/{value}")
    async def route(value: int, mediator: MediatorDep) -> int:
        return await mediator.send(SampleDouble(value=value))

    app.dependency_overrides[get_mediator] = lambda: catga.mediator
    with TestClient(app) as client:
        assert client.get("/double/8").json() == 16
