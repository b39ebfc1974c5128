"""Message schemas as nodes advertise and compare them, so a rolling upgrade never routes a message
to a node that could not read it.

Each node puts, per message type it handles, one short string in its membership record::

    <fingerprint>|<message fields>|<result>

- the fingerprint is 12 hex digits of a SHA-256 over the canonical JSON schema of the message and
  of its result (titles, descriptions, examples and defaults left out: they change nothing on the
  wire);
- the message fields are ``name:hash`` (``name?:hash`` when the field has a default), ``message_id``
  left out, with a leading ``!`` when the model forbids unknown fields; each hash is 6 hex digits of
  that field's own canonical schema, nested models inlined;
- the result is the same for a pydantic model result, or ``=hash`` for any other type (one hash for
  the whole type); events have none.

The rule (`problems`), for a node that sends a message to a peer: equal fingerprints are
compatible. Otherwise the *reader* of each direction must be able to take what the *writer* sends:
the peer reads the message this node writes, and this node reads the result the peer writes. A
reader can take it when every field it requires is among the writer's fields, every field both
have has the same schema, and (for a reader that forbids unknown fields) the writer has no field
the reader lacks. So adding a field with a default is compatible both ways; adding a required
field, removing or renaming a required field, or changing a field's type is not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from urllib.parse import quote, unquote

from pydantic import AliasChoices, BaseModel
from pydantic.errors import PydanticInvalidForJsonSchema

from fastapi_catga.core.messages import Message, Request

__all__ = ["Shape", "TypeSchema", "advertised", "problems", "schema_of"]

#: Keywords that document a schema but change nothing about what validates (``readOnly``: a
#: computed field, which only the serialization schema has).
_NOTES = frozenset({"title", "description", "examples", "default", "deprecated", "$comment", "readOnly"})
_FINGERPRINT = 12
_FIELD_HASH = 6


def _digest(value: Any, size: int) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:size]


def _canonical(schema: Any, defs: dict[str, Any], stack: tuple[str, ...] = ()) -> Any:
    """The schema with its notes dropped and its ``$ref``s inlined (a recursive one by depth, so a
    nested class keeps its hash when renamed)."""
    if isinstance(schema, list):
        return [_canonical(item, defs, stack) for item in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        name = ref.removeprefix("#/$defs/")
        if name in stack:
            return {"$recursive": len(stack) - stack.index(name)}
        return _canonical(defs.get(name, {}), defs, (*stack, name))
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _NOTES or key == "$defs":
            continue
        if key == "properties" and isinstance(value, dict):
            out[key] = {name: _canonical(sub, defs, stack) for name, sub in value.items()}
        elif key == "required" and isinstance(value, list):
            out[key] = sorted(value)
        else:
            out[key] = _canonical(value, defs, stack)
    return out


@dataclass(frozen=True, slots=True)
class Shape:
    """What one side of an exchange looks like: a model's fields, or one hash for another type."""

    #: Field name -> (hash of its schema, required); None for a type that is not a model.
    fields: dict[str, tuple[str, bool]] | None = None
    #: The hash of the whole type, when it is not a model.
    value: str = ""
    #: The model forbids fields it does not know (``extra="forbid"``).
    closed: bool = False

    @classmethod
    def of(cls, schema: dict[str, Any], *, skip: frozenset[str] = frozenset()) -> Shape:
        defs = schema.get("$defs", {})
        top = _canonical(schema, defs)
        properties = top.get("properties") if top.get("type") == "object" else None
        if not isinstance(properties, dict):
            return cls(value=_digest(top, _FIELD_HASH))
        required = set(top.get("required", ()))
        fields = {
            name: (_digest(sub, _FIELD_HASH), name in required)
            for name, sub in properties.items()
            if name not in skip
        }
        return cls(fields=fields, closed=top.get("additionalProperties") is False)

    def encode(self) -> str:
        if self.fields is None:
            return f"={self.value}"
        parts = (
            f"{quote(name, safe='')}{'' if required else '?'}:{digest}"
            for name, (digest, required) in self.fields.items()
        )
        return ("!" if self.closed else "") + ",".join(parts)

    def written(
        self, schema: dict[str, Any], *, renamed: dict[str, str], skip: frozenset[str] = frozenset()
    ) -> Shape | None:
        """The fields a model of this (read) shape writes, from its serialization ``schema``: None
        when they are the ones it reads. A field keeps its read hash, under the name it is written
        with (``renamed``: written name -> read name; a serializer that changes a value's type is
        not seen); one it only writes (a ``computed_field``) gets its own, and one it never writes
        (``exclude=True``) is absent."""
        if self.fields is None:
            return None
        top = _canonical(schema, schema.get("$defs", {}))
        properties = top.get("properties") if top.get("type") == "object" else None
        if not isinstance(properties, dict):
            return None
        fields = {
            name: self.fields.get(renamed.get(name) or name) or (_digest(sub, _FIELD_HASH), True)
            for name, sub in properties.items()
            if name not in skip
        }
        return None if fields.keys() == self.fields.keys() else Shape(fields=fields)

    @classmethod
    def decode(cls, text: str) -> Shape:
        if text.startswith("="):
            return cls(value=text[1:])
        closed = text.startswith("!")
        fields: dict[str, tuple[str, bool]] = {}
        for part in filter(None, text.removeprefix("!").split(",")):
            name, _, digest = part.rpartition(":")
            if not name or not digest:
                raise ValueError(f"bad field {part!r}")
            optional = name.endswith("?")
            fields[unquote(name.removesuffix("?"))] = (digest, not optional)
        return cls(fields=fields, closed=closed)


@dataclass(frozen=True, slots=True)
class TypeSchema:
    """One message type's fingerprint and shapes, as a membership record carries them."""

    fingerprint: str
    #: The message's fields as this node reads them.
    message: Shape
    #: None for an event (it has no result).
    result: Shape | None = None
    #: The fields this node writes, where they are not the ones it reads (`Shape.written`).
    message_out: Shape | None = None
    result_out: Shape | None = None
    text: str = field(default="", compare=False)

    @property
    def message_written(self) -> Shape:
        return self.message_out or self.message

    @property
    def result_written(self) -> Shape | None:
        return self.result_out or self.result

    def encode(self) -> str:
        result = "" if self.result is None else self.result.encode()
        text = f"{self.fingerprint}|{self.message.encode()}|{result}"
        if self.message_out is None and self.result_out is None:
            return text  # as records have always been: a node of an older version reads it
        outs = (shape.encode() if shape is not None else "" for shape in (self.message_out, self.result_out))
        return f"{text}|{'|'.join(outs)}"

    @classmethod
    def decode(cls, text: str) -> TypeSchema:
        """Read a record's string.

        Raises:
            ValueError: it is not one `encode` writes.
        """
        parts = text.split("|")  # parts after the fifth: a later version's, not read here
        if len(parts) < 3 or not parts[0]:
            raise ValueError(f"not a message schema: {text[:80]!r}")
        result, message_out, result_out = (
            Shape.decode(part) if part else None for part in [*parts[2:], "", ""][:3]
        )
        return cls(parts[0], Shape.decode(parts[1]), result, message_out, result_out, text)


@cache
def schema_of(message_type: type[Message]) -> TypeSchema | None:
    """The schema a node advertises for a message type (computed once per class); None when
    pydantic has no JSON schema for it (an arbitrary type inside): such a type is not compared."""
    skip = frozenset({"message_id"})
    try:
        message = message_type.model_json_schema(mode="validation")
        message_out = message_type.model_json_schema(mode="serialization")
        result: dict[str, Any] | None = None
        result_out: dict[str, Any] | None = None
        if issubclass(message_type, Request):
            result = message_type.result_adapter().json_schema(mode="validation")
            result_out = message_type.result_adapter().json_schema(mode="serialization")
    except PydanticInvalidForJsonSchema:
        return None
    read = Shape.of(message, skip=skip)
    written = read.written(message_out, renamed=_renamed(message_type), skip=skip)
    read_result = None if result is None else Shape.of(result)
    written_result = None
    if read_result is not None and result_out is not None and issubclass(message_type, Request):
        result_type = message_type.result_adapter().core_schema.get("cls")
        renamed = (
            _renamed(result_type)
            if isinstance(result_type, type) and issubclass(result_type, BaseModel)
            else {}
        )
        written_result = read_result.written(result_out, renamed=renamed)
    canonical = [_canonical(message, message.get("$defs", {}))]
    if result is not None:
        canonical.append(_canonical(result, result.get("$defs", {})))
    for shape, out in ((written, message_out), (written_result, result_out)):
        if shape is not None and out is not None:  # only then: the fingerprints of others stay
            canonical.append(_canonical(out, out.get("$defs", {})))
    schema = TypeSchema(_digest(canonical, _FINGERPRINT), read, read_result, written, written_result)
    return dataclasses.replace(schema, text=schema.encode())


def _renamed(model: type[BaseModel]) -> dict[str, str]:
    """The fields of ``model`` written under another name than they are read: written -> read."""
    found: dict[str, str] = {}
    for name, info in model.model_fields.items():
        written = info.serialization_alias or info.alias or name
        read = info.validation_alias
        if isinstance(read, AliasChoices):  # the schema shows the first choice
            read = read.choices[0]
        read = read if isinstance(read, str) else info.alias or name
        if written != read:
            found[written] = read
    return found


def advertised(message_types: Iterable[type[Message]]) -> dict[str, str]:
    """What a membership record carries: each type's schema string, by type name."""
    schemas = ((t.type_name, schema_of(t)) for t in message_types)
    return {name: schema.text for name, schema in sorted(schemas, key=lambda pair: pair[0]) if schema}


def problems(mine: TypeSchema, theirs: TypeSchema, peer: str) -> list[str]:
    """What keeps this node from sending the type to ``peer`` (empty: compatible).

    ``peer`` names the other node in the sentences (``"node b (app 2.0)"``).
    """
    if mine.fingerprint == theirs.fingerprint:
        return []
    found = [
        f"message {text}" for text in _unreadable(theirs.message, mine.message_written, peer, "this node")
    ]
    if mine.result is not None and (their_result := theirs.result_written) is not None:
        found += [f"result {text}" for text in _unreadable(mine.result, their_result, "this node", peer)]
    elif (mine.result is None) != (theirs.result is None):
        found.append("is an event on one side and a command or query on the other")
    return found


def _unreadable(reader: Shape, writer: Shape, reader_name: str, writer_name: str) -> list[str]:
    """Why ``reader_name`` could not validate what ``writer_name`` encodes (empty: it could)."""
    if reader.fields is None or writer.fields is None:
        if reader.fields is None and writer.fields is None and reader.value == writer.value:
            return []
        return [f"type differs between {reader_name} and {writer_name}"]
    found: list[str] = []
    for name, (digest, required) in reader.fields.items():
        theirs = writer.fields.get(name)
        if theirs is None:
            if required:
                found.append(f"field {name!r}: required on {reader_name}, absent on {writer_name}")
        elif theirs[0] != digest:
            found.append(f"field {name!r}: its type differs between {reader_name} and {writer_name}")
    if reader.closed:
        found += [
            f"field {name!r}: sent by {writer_name}, forbidden on {reader_name} (extra='forbid')"
            for name in writer.fields
            if name not in reader.fields
        ]
    return found
