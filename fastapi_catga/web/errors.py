"""`CatgaError` -> RFC 9457 ``application/problem+json`` answers."""

from __future__ import annotations

import json
import logging
import math
from http import HTTPStatus

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from fastapi_catga.core.envelope import retry_delay
from fastapi_catga.core.logs import LogLimiter, cut, text_of
from fastapi_catga.exceptions import (
    BusyError,
    CatgaError,
    ConfigurationError,
    HandlerNotFoundError,
    MessageTooLargeError,
    MessageValidationError,
    NodeUnavailableError,
    Reject,
    RemoteHandlerError,
    RequestTimeoutError,
    RetryableError,
    RetryLater,
    TransportError,
)

__all__ = ["problem_response", "status_for", "validation_response"]

logger = logging.getLogger(__name__)

_STATUS: list[tuple[type[CatgaError], int, str]] = [
    (HandlerNotFoundError, 404, "No handler"),
    (MessageValidationError, 422, "Invalid message"),
    (MessageTooLargeError, 413, "Message too large"),
    (BusyError, 503, "Busy"),
    (NodeUnavailableError, 503, "No node available"),
    (TransportError, 503, "Broker unavailable"),
    (RequestTimeoutError, 504, "Timed out"),
    (RemoteHandlerError, 502, "Handler failed"),
    (RetryableError, 503, "Try again later"),  # every attempt failed with what may pass
    (Reject, 422, "Rejected"),  # a handler refused the message: no retry can succeed
    (ConfigurationError, 500, "Misconfigured"),
]


def status_for(exc: CatgaError) -> tuple[int, str]:
    """The HTTP status and title for an error: its class's ``http_status`` when that is one of
    400-599, else its nearest built-in family's, else 500."""
    own = getattr(type(exc), "http_status", None)
    if type(own) is int and 400 <= own <= 599:
        try:
            return own, HTTPStatus(own).phrase
        except ValueError:  # a status with no registered phrase (say 499)
            return own, "Catga error"
    for cls, status, title in _STATUS:
        if isinstance(exc, cls):
            return status, title
    return 500, "Catga error"


async def problem_response(request: Request, exc: Exception) -> Response:
    """Exception handler: a `CatgaError` escaping a route becomes a problem+json answer, whatever it
    holds (``details`` that JSON cannot carry are dropped, and the log says so)."""
    assert isinstance(exc, CatgaError)
    status, title = status_for(exc)
    if status >= 500:  # at most one line per status and code an interval: an outage is many
        _log_limit(request).log(
            logger, logging.WARNING, (status, exc.code), "%s %s -> %d: %s",
            request.method, request.url.path, status, cut(text_of(exc)),
        )  # fmt: skip
    body: dict[str, object] = {
        "type": f"urn:catga:error:{exc.code}",
        "title": title,
        "status": status,
        "detail": text_of(exc, "message"),
        "instance": request.url.path,
    }
    # A subclass may skip CatgaError.__init__: what it sets may be missing.
    if node_id := getattr(exc, "node_id", None):
        body["node_id"] = str(node_id)
    if isinstance(exc, RemoteHandlerError):
        body["error_type"] = str(getattr(exc, "error_type", type(exc).__name__))
    details, content = getattr(exc, "details", None), None
    if details is not None:
        key = "errors" if isinstance(exc, MessageValidationError) else "details"
        try:  # details may hold what JSON cannot (pydantic's errors() keep the exception in ctx)
            content = _render({**body, key: details})
        except Exception as unfit:  # a cycle, a NaN, a tuple key, an object whose str() raises
            logger.warning("dropped the details of %s from its answer: %r", type(exc).__name__, unfit)
    if content is None:
        content = _render(body)
    # Busy: the node(s) had no room now; say when trying again makes sense (RFC 9110, seconds).
    headers = {"Retry-After": str(retry_after)} if (retry_after := _retry_after(exc)) else None
    return Response(content, status_code=status, headers=headers, media_type="application/problem+json")


def _retry_after(exc: CatgaError) -> int | None:
    """Seconds after which trying again makes sense (RFC 9110), for an error that says so."""
    if isinstance(exc, BusyError):
        return exc.retry_after
    delay = retry_delay(exc) if isinstance(exc, RetryLater) else 0.0
    return max(1, math.ceil(delay)) if delay > 0 else None


async def validation_response(request: Request, exc: Exception) -> Response:
    """FastAPI's own 422 for a request that does not validate, the same body, written so that it
    cannot fail: its errors echo the input, and FastAPI's answer to a lone surrogate in it (one
    ``"\\ud800"`` in a client's JSON) was a 500 of its own (`_render`). Installed in place of
    FastAPI's default handler only."""
    assert isinstance(exc, RequestValidationError)
    body = {"detail": jsonable_encoder(exc.errors())}
    return Response(_render(body), status_code=422, media_type="application/json")


def _render(body: dict[str, object]) -> bytes:
    """JSON as FastAPI writes it, but never failing on text: a lone surrogate is escaped."""
    return json.dumps(body, default=str, allow_nan=False, separators=(",", ":")).encode()


def _log_limit(request: Request) -> LogLimiter:
    """The app's limiter of these lines (one per app, made on first use)."""
    state = request.app.state
    limiter = getattr(state, "catga_error_log_limit", None)
    if not isinstance(limiter, LogLimiter):
        limiter = state.catga_error_log_limit = LogLimiter()
    return limiter
