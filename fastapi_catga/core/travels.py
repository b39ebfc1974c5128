"""What holds a run here to what travels, so that it ends as a run on another node would: its
message within the payload limit, its result JSON and within the limit too, and read back from
its JSON as the caller would read it. A send that works on one node must not fail once a second
node joins, nor return something else.

Encoding a small message costs about as much as the rest of an in-process send (some 5,600 CPU
instructions). A bound of its JSON from its fields' values, in Python, measured hardly cheaper
(about 4,900), so every message is encoded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import TypeAdapter, ValidationError

from fastapi_catga.core.envelope import (
    HEADROOM,
    NODE,
    PER_REPLY,
    STATUS,
    Envelope,
    check_size,
    refuse_non_finite,
    result_mismatch,
)
from fastapi_catga.core.messages import Message
from fastapi_catga.exceptions import RemoteHandlerError

__all__ = ["result_check", "result_not_json"]


def result_check(
    adapter: TypeAdapter[Any], *, node_id: str, max_payload: int
) -> Callable[[Message, Any], Any]:
    """The check of a (validated) result of a request type with result ``adapter``, made by a run
    here: it returns the result as a caller on another node would get it, or raises what that
    caller gets. A str, int, float, bool or None comes back as it is; anything else is read back
    from its JSON, so that the caller never holds the handler's own object, and a value that JSON
    changes (a set in an ``Any``, a field serializer's output) changes here as well.

    Raises (the check):
        MessageTooLargeError: over ``max_payload`` bytes encoded (`encode_result`).
        RemoteHandlerError: it is no JSON (`result_not_json`).
        MessageValidationError: its JSON does not validate as the result type (`result_mismatch`).
    """
    short = (max_payload - HEADROOM - 2) // 6  # an ASCII str this long or shorter always fits
    validate_json = adapter.validator.validate_json

    def check(message: Message, result: Any) -> Any:
        kind = type(result)
        if kind is str:
            # An ASCII str holds no lone surrogate, and takes 6 bytes a character at most in JSON.
            if len(result) <= short and result.isascii():
                return result
        elif result is None or kind is bool or kind is int and result.bit_length() <= 64:
            return result
        try:
            refuse_non_finite(result)
            body = adapter.serializer.to_json(result)
        except Exception as exc:
            raise result_not_json(message, node_id, exc) from exc
        if len(body) + HEADROOM > max_payload:
            check_size(Envelope({STATUS: "ok", NODE: node_id}, body), max_payload, "the result", PER_REPLY)
        if kind is str or kind is int or kind is float:
            return result  # what its JSON reads back as
        try:
            return validate_json(body)
        except ValidationError as exc:
            raise result_mismatch(node_id, exc) from exc

    return check


def result_not_json(message: Message, node_id: str, exc: BaseException) -> RemoteHandlerError:
    """The error of a result that validates, yet is no JSON (an `Any` result holding some object)."""
    return RemoteHandlerError(
        f"the result of {message.type_name} on node {node_id} is not JSON",
        error_type=type(exc).__name__,
        node_id=node_id,
    )
