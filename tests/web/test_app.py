"""The FastAPI layer end to end: the example app, problem+json answers, the lifespan and health."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from fastapi import Depends, FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError, field_validator

from example_app import orders
from example_app.main import app as example_app
from fastapi_catga import (
    CatgaError,
    CatgaSettings,
    Command,
    ConfigurationError,
    HandlerNotFoundError,
    InMemoryBroker,
    InMemoryTransport,
    Mediator,
    MediatorDep,
    MessageTooLargeError,
    MessageValidationError,
    NodeUnavailableError,
    NoResponderError,
    Query,
    RemoteHandlerError,
    RequestTimeoutError,
    RetryableError,
    TransportError,
    build,
    catga_lifespan,
    catga_router,
    get_mediator,
)
from tests.core import handlers_sample
from tests.core.handlers_sample import SampleDouble

PROBLEM_JSON = "application/problem+json"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("CATGA_")]:
        monkeypatch.delenv(name)


# -- the example app -------------------------------------------------------------------------------------


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(example_app) as client:
        yield client


def test_example_app_places_and_reads_an_order(client: TestClient) -> None:
    reserved = orders.stock_reserved["kiwi"]
    response = client.post("/orders", json={"sku": "kiwi", "quantity": 3})
    assert response.status_code == 201
    order = response.json()
    assert order == {"order_id": order["order_id"], "sku": "kiwi", "quantity": 3, "status": "placed"}

    response = client.get(f"/orders/{order['order_id']}")
    assert response.status_code == 200
    assert response.json() == order
    # The OrderPlaced event reached both of its handlers.
    assert orders.stock_reserved["kiwi"] == reserved + 3
    assert f"order {order['order_id']}: 3 x kiwi confirmed" in orders.notifications


def test_example_app_unknown_order_is_404(client: TestClient) -> None:
    response = client.get("/orders/no-such-order")
    assert response.status_code == 404
    assert response.json() == {"detail": "no order no-such-order"}


def test_example_app_invalid_body_is_422_with_field_errors(client: TestClient) -> None:
    response = client.post("/orders", json={"sku": "", "quantity": 0})
    assert response.status_code == 422
    errors = {tuple(error["loc"]): error["type"] for error in response.json()["detail"]}
    assert errors == {("body", "sku"): "string_too_short", ("body", "quantity"): "greater_than"}


def test_example_app_stats_counts_per_node(client: TestClient) -> None:
    node_id = client.get("/catga/nodes/current").json()["node_id"]
    before = client.get("/stats").json()[node_id]
    assert client.post("/orders", json={"sku": "fig", "quantity": 1}).status_code == 201
    after = client.get("/stats").json()
    assert list(after) == [node_id]
    assert after[node_id]["PlaceOrder"] == before.get("PlaceOrder", 0) + 1
    assert after[node_id]["OrderPlaced"] == before.get("OrderPlaced", 0) + 2  # two handlers
    assert after[node_id]["GetStats"] == before.get("GetStats", 0) + 1


def test_example_app_catga_routes(client: TestClient) -> None:
    nodes = client.get("/catga/nodes")
    assert nodes.status_code == 200
    [node] = nodes.json()
    assert client.get("/catga/nodes/current").json() == node
    assert node["handles"] == ["GetOrder", "GetStats", "PlaceOrder"]
    assert node["events"] == ["OrderPlaced"]
    assert set(node) >= {"node_id", "endpoint", "last_seen", "metadata"}

    health = client.get("/catga/health")
    assert health.status_code == 200
    assert health.json() | {"stats": {}} == {
        "status": "ok",
        "transport": "memory",
        "connected": True,
        "node_id": node["node_id"],
        "members": 1,
        "view_stale": False,
        "stats": {},
    }


# -- problem+json ------------------------------------------------------------------------------------------


class WBoom(Command[None]):
    pass


class WMissing(Query[int]):
    pass


async def boom(command: WBoom) -> None:
    raise ValueError("the handler broke")


ERRORS: dict[str, tuple[Callable[[], CatgaError], int]] = {
    "not-found": (lambda: HandlerNotFoundError("no handler for X"), 404),
    "invalid": (lambda: MessageValidationError("bad", details=[{"loc": ["sku"], "msg": "too short"}]), 422),
    "too-large": (lambda: MessageTooLargeError("too big", details={"size": 2048, "limit": 1024}), 413),
    "no-node": (lambda: NodeUnavailableError("nobody"), 503),
    "transport": (lambda: TransportError("broker gone"), 503),
    "no-responder": (lambda: NoResponderError("nobody listens"), 503),
    "timeout": (lambda: RequestTimeoutError("too slow", node_id="n9"), 504),
    "remote": (lambda: RemoteHandlerError("it raised", error_type="KeyError", node_id="n9"), 502),
    "config": (lambda: ConfigurationError("misconfigured"), 500),
    "retryable": (lambda: RetryableError("try again"), 500),
}


def catga_app(**options: Any) -> FastAPI:
    options.setdefault("settings", CatgaSettings(node_id="web-node"))
    options.setdefault("handlers", [boom, "tests.core.handlers_sample"])
    options.setdefault("transport", InMemoryTransport())
    app = FastAPI(lifespan=catga_lifespan(**options))
    app.include_router(catga_router)

    @app.get("/raise/{name}")
    async def raise_error(name: str) -> None:
        raise ERRORS[name][0]()

    @app.get("/boom")
    async def send_boom(mediator: MediatorDep) -> None:
        await mediator.send(WBoom())

    @app.get("/missing")
    async def send_missing(mediator: MediatorDep) -> int:
        return await mediator.send(WMissing())

    @app.get("/double/{value}")
    async def double(value: int, mediator: MediatorDep) -> int:
        return await mediator.send(SampleDouble(value=value))

    return app


@pytest.mark.parametrize("name", list(ERRORS))
def test_catga_error_becomes_problem_json(name: str) -> None:
    make, status = ERRORS[name]
    expected = make()
    with TestClient(catga_app()) as client:
        response = client.get(f"/raise/{name}")
    assert response.status_code == status
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert body["type"] == f"urn:catga:error:{expected.code}"
    assert body["status"] == status
    assert body["detail"] == expected.message
    assert body["instance"] == f"/raise/{name}"
    assert body["title"]
    if expected.node_id:
        assert body["node_id"] == expected.node_id
    if isinstance(expected, MessageValidationError):
        assert body["errors"] == expected.details
    elif expected.details is not None:
        assert body["details"] == expected.details
    if isinstance(expected, RemoteHandlerError):
        assert body["error_type"] == expected.error_type


def test_problem_json_with_pydantic_error_details() -> None:
    class Positive(BaseModel):
        x: int

        @field_validator("x")
        @classmethod
        def positive(cls, value: int) -> int:
            if value < 0:
                raise ValueError("must be positive")
            return value

    with pytest.raises(ValidationError) as info:
        Positive(x=-1)
    app = catga_app()

    @app.get("/pydantic-details")
    async def pydantic_details() -> None:
        raise MessageValidationError("invalid", details=info.value.errors())

    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/pydantic-details")
    assert response.status_code == 422
    assert response.headers["content-type"] == PROBLEM_JSON
    [error] = response.json()["errors"]
    assert error["loc"] == ["x"]
    assert "must be positive" in error["ctx"]["error"]


def test_failing_handler_is_a_502_problem_naming_the_exception() -> None:
    with TestClient(catga_app()) as client:
        response = client.get("/boom")
    assert response.status_code == 502
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert body["error_type"] == "ValueError"
    assert body["node_id"] == "web-node"
    assert body["detail"].startswith("WBoom handler raised ValueError on node web-node (message ")
    assert "the handler broke" not in body["detail"], "the text stays in the node's log"


def test_unhandled_query_is_a_404_problem() -> None:
    with TestClient(catga_app()) as client:
        response = client.get("/missing")
    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json()["type"] == "urn:catga:error:handler_not_found"


# -- the lifespan ------------------------------------------------------------------------------------------


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


def test_health_is_503_while_the_broker_is_down() -> None:
    broker = InMemoryBroker()
    with TestClient(catga_app(transport=InMemoryTransport(broker))) as client:
        assert client.get("/catga/health").status_code == 200
        assert client.portal is not None
        client.portal.call(broker.outage)
        down = client.get("/catga/health")
        assert down.status_code == 503
        assert down.json()["connected"] is False
        assert down.json()["status"] == "unavailable"
        client.portal.call(broker.restore)
        assert client.get("/catga/health").status_code == 200


@pytest.mark.parametrize("order_id", ["", "a/b", "x" * 65, "a b"])
def test_the_example_refuses_an_order_id_that_could_not_be_read_back(order_id: str) -> None:
    from example_app.main import app as example

    with TestClient(example) as client:
        response = client.post("/orders", json={"order_id": order_id, "sku": "apple", "quantity": 1})
        assert response.status_code == 422
        assert client.get("/orders/a%20b").status_code == 422
        placed = client.post("/orders", json={"order_id": "o-1", "sku": "apple", "quantity": 1})
        assert client.get(f"/orders/{placed.json()['order_id']}").json()["order_id"] == "o-1"
