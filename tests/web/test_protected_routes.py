"""Every router takes the app's own auth the FastAPI way, ``include_router(..., dependencies=[...])``:
an API-key header, an OAuth2 bearer token or HTTP Basic, on every route (the dashboard's event stream
and ``/catga/metrics`` included); the health probe can stay open."""

from __future__ import annotations

import base64
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI, HTTPException, Security
from fastapi.security import APIKeyHeader, HTTPBasic, HTTPBasicCredentials, OAuth2PasswordBearer
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from fastapi_catga import (
    CatgaSettings,
    DashboardObserver,
    catga_admin_router,
    catga_cluster_router,
    catga_dashboard_router,
    catga_health_router,
    catga_lifespan,
    catga_router,
)
from fastapi_catga.prometheus import PrometheusObserver
from fastapi_catga.testing import InMemoryTransport

API_KEY, TOKEN, PASSWORD = "key-3f9a", "token-77c1", "pw-e41b"

api_key_header = APIKeyHeader(name="X-API-Key")
bearer = OAuth2PasswordBearer(tokenUrl="token")
basic = HTTPBasic()


def require_api_key(key: Annotated[str, Security(api_key_header)]) -> None:
    if not secrets.compare_digest(key, API_KEY):
        raise HTTPException(403, "wrong API key")


def require_token(token: Annotated[str, Security(bearer)]) -> None:
    if not secrets.compare_digest(token, TOKEN):
        raise HTTPException(403, "wrong token")


def require_operator(credentials: Annotated[HTTPBasicCredentials, Depends(basic)]) -> None:
    if not secrets.compare_digest(credentials.password, PASSWORD):
        raise HTTPException(403, "wrong password")


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass(frozen=True)
class Scheme:
    dependency: Callable[..., None]
    good: dict[str, str]
    bad: dict[str, str]


SCHEMES = {
    "api-key": Scheme(require_api_key, {"X-API-Key": API_KEY}, {"X-API-Key": "guess"}),
    "oauth2-bearer": Scheme(
        require_token, {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": "Bearer guess"}
    ),
    "http-basic": Scheme(
        require_operator,
        {"Authorization": basic_auth("ops", PASSWORD)},
        {"Authorization": basic_auth("ops", "guess")},
    ),
}
ROUTES = [
    "/catga/nodes",
    "/catga/nodes/current",
    "/catga/health",
    "/catga/metrics",
    "/catga/dead-letters",
    "/catga/dashboard",
    "/catga/dashboard/events?interval=0.05&seconds=0.1",
]


def protected_app(auth: Callable[..., None], *, open_health: bool = False) -> FastAPI:
    observers: list[Any] = [PrometheusObserver(CollectorRegistry()), DashboardObserver()]
    app = FastAPI(
        lifespan=catga_lifespan(
            settings=CatgaSettings(node_id="guarded"),
            handlers=["tests.core.handlers_sample"],
            transport=InMemoryTransport(),
            observers=observers,
        )
    )
    guard = [Depends(auth)]
    if open_health:
        app.include_router(catga_health_router)
        app.include_router(catga_cluster_router, dependencies=guard)
    else:
        app.include_router(catga_router, dependencies=guard)
    app.include_router(catga_admin_router, dependencies=guard)
    app.include_router(catga_dashboard_router, dependencies=guard)
    return app


@pytest.mark.parametrize("scheme", SCHEMES.values(), ids=SCHEMES.keys())
def test_every_route_needs_the_credentials(scheme: Scheme) -> None:
    with TestClient(protected_app(scheme.dependency)) as client:
        for route in ROUTES:
            missing = client.get(route)
            assert missing.status_code == 401, (route, missing.text)
            assert missing.headers["www-authenticate"], route  # says which scheme to use
            assert client.get(route, headers=scheme.bad).status_code == 403, route
            allowed = client.get(route, headers=scheme.good)
            assert allowed.status_code == 200, (route, allowed.text)
        stream = client.get(ROUTES[-1], headers=scheme.good)
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert '"node_id": "guarded"' in stream.text
        assert "catga_" in client.get("/catga/metrics", headers=scheme.good).text


def test_the_health_probe_can_stay_open_while_the_rest_is_protected() -> None:
    with TestClient(protected_app(require_api_key, open_health=True)) as client:
        assert client.get("/catga/health").status_code == 200
        assert client.get("/catga/health").json()["status"] == "ok"
        for route in ROUTES:
            if route != "/catga/health":
                assert client.get(route).status_code == 401, route
                assert client.get(route, headers={"X-API-Key": API_KEY}).status_code == 200, route


def test_the_split_routers_are_catga_router_without_duplicates() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a duplicate operation id would warn
        whole = protected_app(require_api_key).openapi()
        split = protected_app(require_api_key, open_health=True).openapi()
    assert whole["paths"].keys() == split["paths"].keys()
    assert {"/catga/health", "/catga/nodes", "/catga/metrics"} <= whole["paths"].keys()
    assert whole["paths"]["/catga/health"]["get"]["security"] == [{"APIKeyHeader": []}]
    assert split["paths"]["/catga/nodes"]["get"]["security"] == [{"APIKeyHeader": []}]
    assert "security" not in split["paths"]["/catga/health"]["get"]


def test_the_readme_example(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.web import protected_app

    monkeypatch.setenv("OPS_API_KEY", API_KEY)
    app = protected_app.app
    monkeypatch.setattr(
        app.router, "lifespan_context", catga_lifespan(handlers=[], transport=InMemoryTransport())
    )
    with TestClient(app) as client:
        assert client.get("/catga/health").status_code == 200
        for route in ROUTES:
            if route not in ("/catga/health", "/catga/metrics"):  # no metrics observer there: 404
                assert client.get(route).status_code == 401, route
                assert client.get(route, headers={"X-API-Key": "guess"}).status_code == 403, route
                assert client.get(route, headers={"X-API-Key": API_KEY}).status_code == 200, route
        assert client.get("/catga/metrics").status_code == 401
