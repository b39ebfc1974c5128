"""`CatgaError` -> RFC 9457 ``application/problem+json`` answers."""

from __future__ import annotations

import json
import logging

from fastapi import Request
from fastapi.responses import JSONResponse

from fastapi_catga.exceptions import (
    BusyError,
    CatgaError,
    ConfigurationError,
    HandlerNotFoundError,
    MessageTooLargeError,
    MessageValidationError,
    NodeUnavailableError,
    RemoteHandlerError,
    RequestTimeoutError,
    TransportError,
)

__all__ = ["problem_response", "status_for"]

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
    (ConfigurationError, 500, "Misconfigured"),
]


def status_for(exc: CatgaError) -> tuple[int, str]:
    """The HTTP status and title for an error."""
    for cls, status, title in _STATUS:
        if isinstance(exc, cls):
            return status, title
    return 500, "Catga error"


async def problem_response(request: Request, exc: Exception) -> JSONResponse:
    """Exception handler: a `CatgaError` escaping a route becomes a problem+json answer."""
    assert isinstance(exc, CatgaError)
    status, title = status_for(exc)
    if status >= 500:
        logger.warning("%s %s -> %d: %s", request.method, request.url.path, status, exc)
    body: dict[str, object] = {
        "type": f"urn:catga:error:{exc.code}",
        "title": title,
        "status": status,
        "detail": exc.message,
        "instance": request.url.path,
    }
    if exc.node_id:
        body["node_id"] = exc.node_id
    if isinstance(exc, RemoteHandlerError):
        body["error_type"] = exc.error_type
    if exc.details is not None:
        # Details may hold what JSON cannot (pydantic's errors() keeps the exception in ctx).
        details = json.loads(json.dumps(exc.details, default=str))
        body["errors" if isinstance(exc, MessageValidationError) else "details"] = details
    # Busy: the node(s) had no room now; say when trying again makes sense (RFC 9110, seconds).
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, BusyError) else None
    return JSONResponse(body, status_code=status, headers=headers, media_type="application/problem+json")
