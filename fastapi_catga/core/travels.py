"""What holds a run here to what travels, so that it ends as a run on another node would: its
message within the payload limit, its result JSON and within the limit too, and read back from
its JSON as the caller would read it. A send that works on one node must not fail once a second
node joins, nor return something else.

Encoding a small message costs about as much as the rest of an in-process send (some 5,600 CPU
instructions). A bound of its JSON from its fields' values, in Python, measured hardly cheaper
(about 4,900), so every message is encoded.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Annotated, Any, TypeVar, cast

from pydantic import BaseModel, TypeAdapter, ValidationError

from fastapi_catga.core.envelope import (
    HEADROOM,
    NODE,
    PER_REPLY,
    STATUS,
    Envelope,
    check_size,
    decode_body,
    encode_message,
    message_room,
    refuse_non_finite,
    result_mismatch,
)
from fastapi_catga.core.messages import Message, new_message_id
from fastapi_catga.exceptions import MessageTooLargeError, MessageValidationError, RemoteHandlerError

M = TypeVar("M", bound=Message)

__all__ = [
    "as_received",
    "body_of",
    "message_travels",
    "needs_reading",
    "reads_back_as_is",
    "result_check",
    "result_not_json",
]


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
    as_is = not _serializes_its_own_way(adapter.core_schema)  # a scalar's JSON reads back as it is

    def check(message: Message, result: Any) -> Any:
        kind = type(result)
        if as_is:
            # An ASCII str holds no lone surrogate, and takes 6 bytes a character at most in JSON.
            if kind is str and len(result) <= short and result.isascii():
                return result
            if result is None or kind is bool or kind is int and result.bit_length() <= 64:
                return result
        try:
            refuse_non_finite(result)
            body = adapter.serializer.to_json(result, by_alias=True)
        except Exception as exc:
            raise result_not_json(message, node_id, exc) from exc
        if len(body) + HEADROOM > max_payload:
            try:
                check_size(
                    Envelope({STATUS: "ok", NODE: node_id}, body), max_payload, "the result", PER_REPLY
                )
            except MessageTooLargeError as exc:
                exc.node_id = node_id  # the node that ran it, as on any other node
                raise
        if as_is and (kind is str or kind is int or kind is float):
            return result  # what its JSON reads back as
        try:
            return validate_json(body)
        except ValidationError as exc:
            raise result_mismatch(node_id, exc) from exc

    return check


def body_of(message_type: type[Message]) -> Callable[[Message], bytes]:
    """The JSON body of a message of ``message_type``, as `encode_message` writes it (by alias),
    at the cost of the plain serializer call for a type of plain fields (`reads_back_as_is`: no
    alias anywhere in it; a keyword costs ~15 % of a small message's encoding, and
    `functools.partial` over it ~150 %)."""
    to_json = message_type.__pydantic_serializer__.to_json
    if reads_back_as_is(message_type):
        return to_json

    def by_alias(message: Message) -> bytes:
        return to_json(message, by_alias=True)

    return by_alias


def message_travels(
    message_type: type[Message], *, source: str, max_payload: int
) -> Callable[[Message, bytes], Message]:
    """What a run here does with a message of ``message_type`` from ``source``, given its JSON
    ``body``, when it is near the limit (`message_room`), of a type that JSON may change or
    holding what validation refuses (`needs_reading`): it returns the message as another node
    would read it.

    Raises (what it returns):
        MessageTooLargeError: over ``max_payload`` bytes as it would be sent (`encode_message`).
        MessageValidationError: its JSON is not valid for its type (`decode_body`).
    """
    room, unchecked = message_room(message_type, source, max_payload), needs_reading(message_type)

    def travels(message: Message, body: bytes) -> Message:
        if len(body) + 6 * len(message.message_id) > room:
            encode_message(message, source=source, max_payload=max_payload)
        if not unchecked(message):
            return message
        try:
            return decode_body(message_type, body)
        except MessageValidationError as exc:
            exc.node_id = source  # the node that could not read it, as another node names itself
            raise

    return travels


def as_received(message: M, body: bytes, types: dict[str, type[Message]]) -> M:
    """``message``, whose JSON is ``body``, as a node with ``types`` (type name to class) reads it:
    itself when that is its registered class and it reads back as it is.

    Raises:
        MessageValidationError: its JSON is not valid for that class (`decode_body`).
    """
    message_type = types.get(message.type_name, type(message))
    if message_type is type(message) and not needs_reading(message_type)(message):
        return message
    return cast(M, decode_body(message_type, body))  # the class registered for its type name


# Their values, once validated, read back from JSON as they are (None as null); each with the
# types of the values validation leaves in it.
_PLAIN_FIELDS: dict[Any, tuple[type, ...]] = {
    str: (str,),
    int: (int,),
    bool: (bool,),
    str | None: (str, type(None)),
    int | None: (int, type(None)),
    bool | None: (bool, type(None)),
}


def _adapter(annotation: Any) -> TypeAdapter[Any]:
    return TypeAdapter(annotation)


def _always(message: Message) -> bool:
    return True


@functools.cache
def needs_reading(message_type: type[Message]) -> Callable[[Message], bool]:
    """Whether a run here must read a message of ``message_type`` back from its JSON, as another
    node does, rather than hand it over as it is: always for a type that JSON may change (not
    `reads_back_as_is`); for the others, when a value is not of the exact type validation leaves
    there, or breaks its field's constraints (``model_construct``, ``model_copy(update=...)``:
    pydantic checks neither), so that a message another node refuses runs nowhere. Each
    constrained value is checked by its validator (about 900 CPU instructions; a check in
    Python measured slower), but for a ``message_id`` its default factory made (not among the
    fields set), which is valid by construction: the usual case costs no validator call."""
    if not reads_back_as_is(message_type):
        return _always
    checks = tuple(
        (
            name,
            _PLAIN_FIELDS[field.annotation],
            _adapter(Annotated[field.annotation, *field.metadata]).validator.validate_python
            if field.metadata
            else None,
            name == "message_id" and field.default_factory is new_message_id,
        )
        for name, field in message_type.model_fields.items()
    )
    count = len(checks)

    def unchecked(message: Message) -> bool:
        values = message.__dict__
        if len(values) != count:  # a field left out (model_construct)
            return True
        for name, kinds, validate, made_if_unset in checks:
            value = values.get(name)
            if type(value) not in kinds:  # (a str subclass too: another node reads a str)
                return True
            if validate is None or made_if_unset and name not in message.__pydantic_fields_set__:
                continue
            try:
                validate(value, strict=True)
            except ValidationError:
                return True
        return False

    return unchecked


@functools.cache
def reads_back_as_is(message_type: type[Message]) -> bool:
    """Whether a (validated) message of ``message_type`` reads back from its JSON as an equal one
    its handler cannot tell from it: frozen (a handler that sets a field of the caller's own
    message changes the caller's), fields of str, int and bool, or None, only (a float may be NaN,
    which JSON writes as null; a container may be the caller's to change), no aliases (but a field's
    own name), no excluded
    field, constraints only of `annotated_types` or a pattern (none that transform), and no validator,
    serializer, post-init hook, private attribute or extra field of its own. Others are decoded
    for each run here (about one validation)."""
    decorators = message_type.__pydantic_decorators__  # pydantic's own: read with care
    kinds = dataclasses.fields(decorators) if dataclasses.is_dataclass(decorators) else None
    if (
        kinds is None
        or any(getattr(decorators, kind.name) for kind in kinds)
        or message_type.model_post_init is not BaseModel.model_post_init
        or message_type.__private_attributes__
        or message_type.model_config.get("extra") == "allow"
        or not message_type.model_config.get("frozen")
    ):
        return False
    return all(
        field.annotation in _PLAIN_FIELDS
        and all(
            alias in (None, name)
            for alias in (field.alias, field.validation_alias, field.serialization_alias)
        )
        and not field.exclude
        and getattr(field, "exclude_if", None) is None
        and all(_keeps_the_value(rule) for rule in field.metadata)
        for name, field in message_type.model_fields.items()
    )


def _keeps_the_value(rule: object) -> bool:
    """Whether a field's constraint only checks its value: `annotated_types`' or a ``pattern``."""
    return type(rule).__module__ == "annotated_types" or (
        type(rule).__name__ == "_PydanticGeneralMetadata" and vars(rule).keys() == {"pattern"}
    )


def _serializes_its_own_way(schema: Any) -> bool:
    """Whether a pydantic core schema, anywhere in it, writes a value with a serializer of its own."""
    if isinstance(schema, dict):
        return "serialization" in schema or any(_serializes_its_own_way(part) for part in schema.values())
    if isinstance(schema, list | tuple):
        return any(_serializes_its_own_way(part) for part in schema)
    return False


def result_not_json(message: Message, node_id: str, exc: BaseException) -> RemoteHandlerError:
    """The error of a result that validates, yet is no JSON (an `Any` result holding some object)."""
    return RemoteHandlerError(
        f"the result of {message.type_name} on node {node_id} is not JSON",
        error_type=type(exc).__name__,
        node_id=node_id,
    )
