"""`CatgaError` -> RFC 9457 ``application/problem+json`` answers."""

from __future__ import annotations

import json
import logging

from fastapi import Request
from fastapi.responses import Response

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


async def problem_response(request: Request, exc: Exception) -> Response:
    """Exception handler: a `CatgaError` escaping a route becomes a problem+json answer, whatever it
    holds (``details`` that JSON cannot carry are dropped, and the log says so)."""
    assert isinstance(exc, CatgaError)
    status, title = status_for(exc)
    if status >= 500:
        logger.warning("%s %s -> %d: %s", request.method, request.url.path, status, _text(exc))
    body: dict[str, object] = {
        "type": f"urn:catga:error:{exc.code}",
        "title": title,
        "status": status,
        "detail": _text(exc, "message"),
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
    headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, BusyError) else None
    return Response(content, status_code=status, headers=headers, media_type="application/problem+json")


def _render(body: dict[str, object]) -> bytes:
    """JSON as FastAPI writes it, but never failing on text: a lone surrogate is escaped."""
    return json.dumps(body, default=str, allow_nan=False, separators=(",", ":")).encode()


def _text(exc: CatgaError, attribute: str | None = None) -> str:
    """The error's message (or text), or a word that it has none that can be read."""
    try:
        return str(getattr(exc, attribute) if attribute else exc)
    except Exception as broken:
        return f"{type(exc).__name__} (its text could not be read: {type(broken).__name__})"
