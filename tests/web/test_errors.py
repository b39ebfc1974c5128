"""`CatgaError` -> RFC 9457 ``application/problem+json``: statuses, bodies and logging."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, ValidationError, field_validator

from fastapi_catga import (
    BusyError,
    CatgaError,
    Command,
    ConfigurationError,
    DuplicateHandlerError,
    HandlerNotFoundError,
    MediatorDep,
    MessageTooLargeError,
    MessageValidationError,
    NodeUnavailableError,
    NoResponderError,
    Query,
    Reject,
    RemoteHandlerError,
    RequestTimeoutError,
    RetryableError,
    RetryLater,
    TransportError,
)
from fastapi_catga.web.errors import status_for
from tests.web.apps import catga_app

PROBLEM_JSON = "application/problem+json"


class Conflict(CatgaError):
    """An app's own error, with the status its routes answer."""

    code = "conflict"
    http_status = 409


class ConflictLike(RemoteHandlerError):
    http_status = 409


class Unusual(CatgaError):
    http_status = 499


class OutOfRange(CatgaError):
    http_status = 200


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
    "busy": (lambda: BusyError("every node tried is busy", node_id="n9"), 503),
    "transport": (lambda: TransportError("broker gone"), 503),
    "no-responder": (lambda: NoResponderError("nobody listens"), 503),
    "timeout": (lambda: RequestTimeoutError("too slow", node_id="n9"), 504),
    "remote": (lambda: RemoteHandlerError("it raised", error_type="KeyError", node_id="n9"), 502),
    "config": (lambda: ConfigurationError("misconfigured"), 500),
    "retryable": (lambda: RetryableError("try again"), 503),
    "rejected": (lambda: Reject("never"), 422),
    "retry-later": (lambda: RetryLater("in a minute", delay=59.5), 503),
    "conflict": (lambda: Conflict("order o-1 was placed already"), 409),
}


def errors_app() -> FastAPI:
    """`catga_app` with `boom` registered, and routes that raise or send what fails."""
    app = catga_app(handlers=[boom, "tests.core.handlers_sample"])

    @app.get("/raise/{name}")
    async def raise_error(name: str) -> None:
        raise ERRORS[name][0]()

    @app.get("/boom")
    async def send_boom(mediator: MediatorDep) -> None:
        await mediator.send(WBoom())

    @app.get("/missing")
    async def send_missing(mediator: MediatorDep) -> int:
        return await mediator.send(WMissing())

    return app


@pytest.mark.parametrize("name", list(ERRORS))
def test_catga_error_becomes_problem_json(name: str) -> None:
    make, status = ERRORS[name]
    expected = make()
    with TestClient(errors_app()) as client:
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


@pytest.mark.parametrize(
    ("error_type", "status", "title"),
    [
        (NoResponderError, 503, "Broker unavailable"),  # a TransportError
        (DuplicateHandlerError, 500, "Misconfigured"),  # a ConfigurationError
        (RequestTimeoutError, 504, "Timed out"),
        (RetryableError, 503, "Try again later"),
        (RetryLater, 503, "Try again later"),  # a RetryableError
        (Reject, 422, "Rejected"),
        (CatgaError, 500, "Catga error"),  # no family of its own
        (Conflict, 409, "Conflict"),  # its own http_status
        (ConflictLike, 409, "Conflict"),  # inherited, over RemoteHandlerError's 502
        (Unusual, 499, "Catga error"),  # a status with no phrase of its own
        (OutOfRange, 500, "Catga error"),  # not an error status: ignored
    ],
)
def test_status_for_goes_by_the_nearest_error_family(
    error_type: type[CatgaError], status: int, title: str
) -> None:
    assert status_for(error_type("x")) == (status, title)


def test_busy_says_when_to_try_again_and_no_other_error_does() -> None:
    with TestClient(errors_app()) as client:
        busy = client.get("/raise/busy")
        gone = client.get("/raise/no-node")
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert busy.json()["title"] == "Busy" and busy.json()["type"] == "urn:catga:error:busy"
    assert gone.status_code == 503 and "retry-after" not in gone.headers


def test_retry_later_says_when_in_whole_seconds() -> None:
    with TestClient(errors_app()) as client:
        later = client.get("/raise/retry-later")
        retryable = client.get("/raise/retryable")
    assert later.status_code == 503 and later.headers["retry-after"] == "60"  # 59.5 s, rounded up
    assert retryable.status_code == 503 and "retry-after" not in retryable.headers  # it says no delay


class Taken(Command[None]):
    pass


async def taken(command: Taken) -> None:
    raise Conflict("that name is taken")


def test_a_handlers_own_error_class_answers_with_its_http_status() -> None:
    app = catga_app(handlers=[taken])

    @app.post("/taken")
    async def send_taken(mediator: MediatorDep) -> None:
        await mediator.send(Taken())

    with TestClient(app) as client:
        response = client.post("/taken")
    assert response.status_code == 409
    assert response.json()["type"] == "urn:catga:error:conflict" and response.json()["title"] == "Conflict"


def test_server_errors_are_logged_and_client_errors_are_not(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fastapi_catga.web.errors")
    with TestClient(errors_app()) as client:
        assert client.get("/raise/not-found").status_code == 404
        for _ in range(20):  # an outage: one line for it, not one a request (well within the 5 s interval)
            assert client.get("/raise/transport").status_code == 503
    messages = [r.getMessage() for r in caplog.records if r.name == "fastapi_catga.web.errors"]
    assert messages == ["GET /raise/transport -> 503: broker gone"]


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
    app = errors_app()

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
    with TestClient(errors_app()) as client:
        response = client.get("/boom")
    assert response.status_code == 502
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert body["error_type"] == "ValueError"
    assert body["node_id"] == "web-node"
    assert body["detail"].startswith("WBoom handler raised ValueError on node web-node (message ")
    assert "the handler broke" not in body["detail"], "the text stays in the node's log"


def test_unhandled_query_is_a_404_problem() -> None:
    with TestClient(errors_app()) as client:
        response = client.get("/missing")
    assert response.status_code == 404
    assert response.headers["content-type"] == PROBLEM_JSON
    assert response.json()["type"] == "urn:catga:error:handler_not_found"


def test_details_json_cannot_carry_are_dropped_and_the_status_kept() -> None:
    cyclic: dict[str, object] = {}
    cyclic["self"] = cyclic
    app = errors_app()

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no text")

    @app.get("/odd/{kind}")
    async def odd(kind: str) -> None:
        details = {
            "nan": {"waited": float("nan")}, "cycle": cyclic, "keys": {(1, 2): "tuple key"},
            "unprintable": {"what": Unprintable()},
        }[kind]  # fmt: skip
        raise RequestTimeoutError("slow downstream \ud800", details=details)

    with TestClient(app) as client:
        for kind in ("nan", "cycle", "keys", "unprintable"):
            answer = client.get(f"/odd/{kind}")
            assert (answer.status_code, answer.headers["content-type"]) == (504, PROBLEM_JSON), kind
            assert answer.json()["detail"] == "slow downstream \ud800" and "details" not in answer.json()


def test_an_error_class_that_skips_catga_errors_init_is_still_a_problem() -> None:
    class Bare(RequestTimeoutError):
        def __init__(self) -> None:  # sets nothing CatgaError would
            Exception.__init__(self, "bare")

    app = errors_app()

    @app.get("/bare")
    async def bare() -> None:
        raise Bare()

    with TestClient(app) as client:
        answer = client.get("/bare")
    assert (answer.status_code, answer.headers["content-type"]) == (504, PROBLEM_JSON)
