"""The wire envelope: headers plus a JSON body, for requests, replies and events.

Bodies are JSON through pydantic; nothing received is ever unpickled or imported by name. Type
names are looked up in the receiving node's registry only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import TypeAdapter, ValidationError
from pydantic_core import PydanticSerializationError, from_json, to_json

from fastapi_catga.core.messages import MAX_TIMEOUT, Message
from fastapi_catga.exceptions import (
    CatgaError,
    HandlerNotFoundError,
    MessageTooLargeError,
    MessageValidationError,
    RemoteHandlerError,
    RetryLater,
    error_class_for,
    error_lineage,
    rebuild_error,
)

__all__ = [
    "ATTEMPT",
    "DEADLINE",
    "DEFAULT_MAX_PAYLOAD",
    "DEAD_LETTER_ROOM",
    "HEADROOM",
    "MAX_TIMEOUT",
    "MESSAGE_ID",
    "MESSAGE_TYPE",
    "NODE",
    "ORIGIN",
    "REPLAYS",
    "PER_ATTEMPT",
    "PER_REPLY",
    "REPLY_NODE",
    "SOURCE",
    "STATUS",
    "Envelope",
    "check_size",
    "decode_body",
    "decode_message",
    "deadline_header",
    "deadline_of",
    "dead_letter_room",
    "decode_reply",
    "encode_error",
    "encode_message",
    "encode_result",
    "error_from_reply",
    "made_by_node",
    "message_room",
    "pack",
    "refuse_non_finite",
    "result_mismatch",
    "validation_details",
    "unpack",
]

#: The largest envelope sent, in bytes, unless settings say otherwise (NATS's own default limit).
DEFAULT_MAX_PAYLOAD = 1024 * 1024
MESSAGE_ID = "catga-id"
MESSAGE_TYPE = "catga-type"
ATTEMPT = "catga-attempt"
SOURCE = "catga-source"
DEADLINE = "catga-deadline"  # absolute UNIX time in ms at which the caller stops waiting for this attempt
STATUS = "catga-status"  # replies: "ok" or "error"
NODE = "catga-node"  # replies: the node that answered
REPLY_NODE = "catga-reply-node"  # durable commands: the node waiting for the outcome, if any
REPLAYS = "catga-replays"  # durable messages: how often a dead letter of it was replayed
# Error replies the responding node made itself, not its handler (it has no handler for the type, the
# message did not decode): "node". The caller may try another node for those, never for a handler's.
ORIGIN = "catga-origin"
_MAX_DEADLINE_DIGITS = 15  # ms since 1970: 13 digits until the year 2286

#: Bytes: more than catga's own headers but their values of any length (a message's id, type name
#: and source; a reply's node id, at most 64), and `PER_ATTEMPT`; bodies closer to the limit are
#: measured exactly.
HEADROOM = 640


@dataclass(slots=True)
class Envelope:
    """What travels: string headers and a body of bytes."""

    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def size(self) -> int:
        """Bytes on the wire as `pack` frames it (its headers' JSON as written, escapes included)."""
        return len(to_json(self.headers)) + 1 + len(self.body)


def budget_of(timeout: object) -> float:
    """A call's ``timeout`` argument as its budget, in seconds.

    Raises:
        MessageValidationError: it is no number of seconds above 0 and at most `MAX_TIMEOUT` (a
            str, a bool, NaN or infinity included): no deadline header could carry it.
    """
    if isinstance(timeout, int | float) and not isinstance(timeout, bool) and 0 < timeout <= MAX_TIMEOUT:
        return float(timeout)
    raise MessageValidationError(
        f"timeout must be positive seconds, at most {MAX_TIMEOUT:g}; got {timeout!r}"
    )


def pack(envelope: Envelope) -> bytes:
    """Frame an envelope as brokers carry it: its headers as one JSON line, then the body.

    One frame for every broker: NATS headers cost nats-py several microseconds each way per
    message, and Redis pub/sub has none.
    """
    return to_json(envelope.headers) + b"\n" + envelope.body


def unpack(data: bytes) -> Envelope:
    """The envelope `pack` framed.

    Raises:
        MessageValidationError: not a frame (no header line, or one that is no JSON object).
    """
    head, newline, body = data.partition(b"\n")
    try:
        headers = from_json(head) if newline else None
    except ValueError:
        headers = None
    # Values are not checked one by one (a cost on every message): readers take them with .get()
    # and treat any value that is not what they expect as missing.
    if type(headers) is not dict:
        raise MessageValidationError("not a catga frame: expected a JSON object, a newline, a body")
    return Envelope(headers, body)


def encode_message(
    message: Message,
    *,
    source: str,
    max_payload: int,
    attempt: int = 1,
    deadline: float | None = None,
    reserve: int = 0,
) -> Envelope:
    """Encode a message for the wire, with room for what each attempt adds (`PER_ATTEMPT`) and
    ``reserve`` bytes more.

    Raises:
        MessageTooLargeError: the encoded message is over ``max_payload`` bytes.
        MessageValidationError: JSON cannot carry it (`unencodable`).
    """
    headers = {
        MESSAGE_ID: message.message_id,
        MESSAGE_TYPE: message.type_name,
        SOURCE: source,
        ATTEMPT: str(attempt),
    }
    if deadline is not None:
        headers[DEADLINE] = deadline_header(deadline)
    try:
        envelope = Envelope(headers, message.__pydantic_serializer__.to_json(message, by_alias=True))
    except PydanticSerializationError as exc:
        raise unencodable(message, exc) from exc
    # Counting header bytes costs: only near the limit.
    room = message_room(type(message), source, max_payload) - reserve
    if len(envelope.body) + 6 * len(message.message_id) > room:
        what = f"{message.type_name} {message.message_id[:200]}"
        kept = "headers added on the way and its dead letter" if reserve else "headers added on the way"
        check_size(envelope, max_payload, what, PER_ATTEMPT + reserve, kept)
    return envelope


def unencodable(message: Message, exc: PydanticSerializationError) -> MessageValidationError:
    """The error of a message that JSON cannot carry (a lone surrogate in a str, an object in an
    ``Any`` field): nothing was sent or run, on any path."""
    return MessageValidationError(
        f"{message.type_name} {message.message_id}: no JSON can carry it ({exc})",
        details=[{"type": "unencodable", "msg": str(exc)}],
    )


def message_room(message_type: type[Message], source: str, max_payload: int) -> int:
    """The JSON body size under which a message of ``message_type`` from ``source``, less 6 bytes a
    character of its id, surely fits; `encode_message` measures a larger one exactly. The headers'
    values of any length are counted in: the type name and source are plain ASCII, an id of the
    caller's may take 6 bytes a character."""
    return max_payload - HEADROOM - len(message_type.type_name) - len(source)


def refuse_non_finite(result: Any) -> None:
    """Raise `ValueError` for a float result that JSON has no number for (NaN, an infinity): pydantic
    would write ``null``, which no float result type validates. (A float inside a model is written
    as it is written.)"""
    if type(result) is float and not math.isfinite(result):
        raise ValueError(f"{result} has no JSON number")


#: Bytes a message's frame grows by on each attempt, after its size was checked: its deadline, its
#: attempt number, a W3C trace context (``traceparent``; a long ``tracestate`` may need more), and
#: the transport's routing (Redis: the reply channel, with a cluster name of up to 64 characters,
#: and a correlation id).
PER_ATTEMPT = 384
#: Bytes a reply's frame grows by after its size was checked: the transport's correlation id.
PER_REPLY = 64
#: Bytes a durable message leaves for its dead letter's record, which is stored beside it in one
#: broker message (NATS), besides its id and type name (`dead_letter_room`): the record's group,
#: reason, node, time and counts, and some of its error's text.
DEAD_LETTER_ROOM = 1024


def dead_letter_room(message: Message) -> int:
    """What ``message`` leaves for its dead letter: `DEAD_LETTER_ROOM`, and its id (twice) and type
    name as the record's ASCII JSON writes them (up to 12 bytes a character)."""
    return DEAD_LETTER_ROOM + 2 * len(json.dumps(message.message_id)) + len(json.dumps(message.type_name))


def check_size(envelope: Envelope, max_payload: int, what: str, reserve: int = 0, kept: str = "") -> None:
    """Raise `MessageTooLargeError` when ``envelope``, with ``reserve`` bytes more (for ``kept``), is
    over the limit."""
    size = envelope.size() + reserve
    if size > max_payload:
        # What is kept beside it is said apart: under a low CATGA_MAX_PAYLOAD a small durable
        # message is refused by its dead letter's room alone.
        beside = f" with {reserve} kept for {kept or 'what travels with it'}" if reserve else ""
        raise MessageTooLargeError(
            f"{what} is {envelope.size()} bytes encoded{beside}, over the {max_payload}-byte "
            "payload limit; send a reference to the data instead, or raise CATGA_MAX_PAYLOAD (and the "
            "broker's limit)",
            details={"size": size, "limit": max_payload},
        )


def deadline_header(deadline: float) -> str:
    """The ``catga-deadline`` value for a UNIX time in seconds: whole milliseconds."""
    return str(int(deadline * 1000))


def deadline_of(envelope: Envelope) -> float | None:
    """The UNIX time (s) at which the caller stops waiting, or None when the frame sets none.

    Raises:
        MessageValidationError: the header is there but is no whole number of milliseconds.
    """
    value = envelope.headers.get(DEADLINE)
    if value is None:
        return None
    if type(value) is not str or not value.isdigit() or len(value) > _MAX_DEADLINE_DIGITS:
        raise MessageValidationError(f"{DEADLINE} must be whole milliseconds since 1970")
    return int(value) / 1000


def decode_message(envelope: Envelope, types: dict[str, type[Message]]) -> Message:
    """Decode a received message with the registry's types.

    Raises:
        HandlerNotFoundError: the type name is missing or not handled here.
        MessageValidationError: the body is not valid JSON for that type.
    """
    type_name = envelope.headers.get(MESSAGE_TYPE)
    if type(type_name) is not str:
        raise MessageValidationError(f"not a catga message: no {MESSAGE_TYPE} header with a type name")
    message_type = types.get(type_name)
    if message_type is None:
        raise HandlerNotFoundError(f"no handler for message type {type_name[:100]!r} on this node")
    return decode_body(message_type, envelope.body)


def decode_body(message_type: type[Message], body: bytes) -> Message:
    """A message of ``message_type`` read from its JSON ``body``.

    Raises:
        MessageValidationError: the body is not valid JSON for that type.
    """
    try:
        # The model's core validator, not `model_validate_json`: the same validation without the
        # wrapper's keyword handling, which cost more than the validation of a small message.
        message: Message = message_type.__pydantic_validator__.validate_json(body)
    except ValidationError as exc:
        raise MessageValidationError(
            f"invalid {message_type.type_name}: {exc.error_count()} validation error(s)",
            details=validation_details(exc),
        ) from exc
    return message


def validation_details(exc: ValidationError) -> list[Any]:
    """Pydantic's errors as plain JSON, without the input: it may be anything (bytes that are no
    UTF-8 included), and a hostile sender's bytes are not echoed back."""
    errors = exc.errors(include_url=False, include_input=False)
    parsed: list[Any] = json.loads(json.dumps(errors, default=str))
    return parsed


def encode_result(value: Any, adapter: TypeAdapter[Any], *, node_id: str, max_payload: int) -> Envelope:
    """Encode a handler's result as a reply; an oversize result becomes an error reply.

    Raises:
        ValueError: the result is no JSON (`refuse_non_finite`, the serializer's own errors).
    """
    if type(value) is float:
        refuse_non_finite(value)
    body = adapter.serializer.to_json(value, by_alias=True)  # as dump_json, in the names validation reads
    envelope = Envelope({STATUS: "ok", NODE: node_id}, body)
    if len(envelope.body) + HEADROOM > max_payload:
        try:
            check_size(envelope, max_payload, "the result", PER_REPLY)
        except MessageTooLargeError as exc:
            return encode_error(exc, node_id=node_id, max_payload=max_payload)
    return envelope


def encode_error(
    exc: CatgaError, *, node_id: str, by_node: bool = False, max_payload: int | None = None
) -> Envelope:
    """Encode an error as a reply that `decode_reply` raises again as the same class.

    Whatever the error holds, there is a reply: an error whose attributes raise or whose details
    are no JSON (a cycle) is sent as its class and a message saying so, and one over
    ``max_payload`` keeps the start of its message and drops its details. Without an answer its
    caller would wait for its deadline and try another node, running the handler again.

    ``by_node``: the answering node made this error itself (no handler here, undecodable message),
    so the handler never ran; the caller may try another node.
    """
    headers = {STATUS: "error", NODE: node_id}
    if by_node:
        headers[ORIGIN] = "node"
    try:
        body = _error_fields(exc)
        data = json.dumps(body, default=str).encode()
    except Exception as failure:
        body = _error_fields(
            exc, f"{type(exc).__name__} (its error could not be encoded: {type(failure).__name__})"
        )
        data = json.dumps(body, default=str).encode()
    if max_payload is not None and len(data) + HEADROOM > max_payload:
        data = _cut(body, max_payload - HEADROOM)
    return Envelope(headers, data)


#: Characters of an error's code and type name an error reply over the payload limit keeps; class
#: names longer than this are left out of its lineage (no class of the caller's has one).
_NAME_ROOM = 200


def _cut(body: dict[str, Any], room: int) -> bytes:
    """An error reply's body in ``room`` bytes: its details dropped, its message cut short, and
    its code and type name too (a generated class named with megabytes)."""
    text = str(body["message"])
    body["details"] = None
    for name in ("code", "error_type"):
        if len(value := str(body[name])) > _NAME_ROOM:
            body[name] = f"{value[:_NAME_ROOM]}..."
    body["lineage"] = [name for name in body["lineage"] if len(name) <= _NAME_ROOM]
    for keep in (1000, 100, 0):  # characters of the message kept
        body["message"] = f"{text[:keep]}... (cut: {len(text)} characters in all, over the payload limit)"
        data = json.dumps(body, default=str, ensure_ascii=False).encode()
        if len(data) <= room:
            break
    return data


def _error_fields(exc: CatgaError, fallback: str | None = None) -> dict[str, Any]:
    """What an error reply carries; with ``fallback`` as its message, only what the class says."""
    if fallback is not None:
        code = getattr(type(exc), "code", "remote_handler_error")
        retryable = getattr(type(exc), "retryable", False)  # the class's word: a property is none
        return {
            "code": code if isinstance(code, str) else "remote_handler_error",
            "message": fallback,
            "error_type": type(exc).__name__,
            "retryable": retryable if isinstance(retryable, bool) else False,
            "details": None,
            "lineage": error_lineage(exc),
        }
    fields = {
        "code": exc.code,
        "message": exc.message,
        "error_type": getattr(exc, "error_type", type(exc).__name__),
        "retryable": bool(exc.retryable),
        "details": exc.details,
        "lineage": error_lineage(exc),
    }
    if isinstance(exc, RetryLater):  # its delay is what its caller waits (and Retry-After says)
        fields["delay"] = retry_delay(exc)
    return fields


def retry_delay(exc: RetryLater) -> float:
    """The seconds ``exc`` asks to wait (`wait_of` its ``delay``)."""
    return wait_of(getattr(exc, "delay", 0.0))  # a subclass may skip RetryLater.__init__


def wait_of(delay: object) -> float:
    """A `RetryLater` delay as seconds to wait: 0 for none, a NaN, a negative number or no number;
    at most `MAX_TIMEOUT` (a longer wait is the longest one, not none)."""
    if isinstance(delay, bool) or not isinstance(delay, int | float) or not delay > 0:  # (NaN too)
        return 0.0
    return float(min(delay, MAX_TIMEOUT))


def decode_reply(envelope: Envelope, adapter: TypeAdapter[Any]) -> Any:
    """The result carried by a reply, or raise the error it carries.

    Raises:
        CatgaError: the error the remote node sent, as its own class.
        MessageValidationError: the result does not match the request's result type.
    """
    node_id = envelope.headers.get(NODE)
    if envelope.headers.get(STATUS) != "error":
        try:
            return adapter.validator.validate_json(envelope.body)  # as validate_json, without its wrapper
        except ValidationError as exc:
            raise result_mismatch(node_id, exc) from exc
    raise error_from_reply(envelope)


def result_mismatch(node_id: Any, exc: ValidationError) -> MessageValidationError:
    """The error of a result whose JSON does not validate as the result type again (a NaN inside a
    model is written as ``null``; a field serializer may write what its type does not read)."""
    return MessageValidationError(
        f"node {node_id} answered with a result that does not match the result type: {exc}",
        node_id=node_id,
    )


def error_from_reply(envelope: Envelope) -> CatgaError:
    """The `CatgaError` an error reply carries, as the nearest class this process defines."""
    node = envelope.headers.get(NODE)
    node_id = node if type(node) is str else None
    try:
        body = json.loads(envelope.body)
        code, message = str(body["code"]), str(body["message"])
        retryable = bool(body.get("retryable", False))
    except (ValueError, KeyError, TypeError):
        return RemoteHandlerError(f"node {node_id} sent an unreadable error reply", node_id=node_id)
    cls = error_class_for(body.get("lineage"), code)
    error = rebuild_error(cls, message, node_id=node_id, details=body.get("details"), retryable=retryable)
    if isinstance(error, RemoteHandlerError):
        error.error_type = str(body.get("error_type", "Exception"))
    elif isinstance(error, RetryLater):
        error.delay = wait_of(body.get("delay"))
    return error


def made_by_node(envelope: Envelope) -> bool:
    """Whether an error reply is the answering node's own (its handler never ran)."""
    return envelope.headers.get(ORIGIN) == "node"
