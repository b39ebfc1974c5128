"""Hostile bytes never break a node: any frame decodes to a message or a `CatgaError`, nothing else."""

from __future__ import annotations

import contextlib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from fastapi_catga import CatgaError, Command, Event, Message
from fastapi_catga.core.envelope import (
    DEADLINE,
    MESSAGE_ID,
    MESSAGE_TYPE,
    NODE,
    STATUS,
    Envelope,
    deadline_of,
    decode_message,
    decode_reply,
    error_from_reply,
    pack,
    unpack,
)


class FuzzOrder(Command[dict[str, int]]):
    sku: str
    quantity: int


class FuzzShipped(Event):
    order: str


TYPES: dict[str, type[Message]] = {"FuzzOrder": FuzzOrder, "FuzzShipped": FuzzShipped}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
headers = st.dictionaries(
    st.sampled_from([MESSAGE_TYPE, MESSAGE_ID, DEADLINE, STATUS, NODE]) | st.text(max_size=10),
    json_values | st.sampled_from(["FuzzOrder", "FuzzShipped", "error", "9" * 400, "1700000000000"]),
    max_size=5,
)
bodies = (
    st.binary(max_size=200)
    | st.builds(lambda value: TypeAdapter(Any).dump_json(value), json_values)
    | st.just(b'{"sku": "a", "quantity": 1}')
)


def receive(data: bytes) -> object:
    """What a responder does with a frame: unpack, read the deadline, decode the message."""
    envelope = unpack(data)
    deadline_of(envelope)
    return decode_message(envelope, TYPES)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_are_a_message_or_a_catga_error(data: bytes) -> None:
    with contextlib.suppress(CatgaError):
        assert isinstance(receive(data), Message)


@settings(max_examples=400, deadline=None)
@given(headers, bodies)
def test_any_well_framed_envelope_is_a_message_or_a_catga_error(head: dict[str, Any], body: bytes) -> None:
    with contextlib.suppress(CatgaError):
        assert isinstance(receive(pack(Envelope(head, body))), Message)


@settings(max_examples=400, deadline=None)
@given(headers, bodies)
def test_any_reply_is_a_result_or_a_catga_error(head: dict[str, Any], body: bytes) -> None:
    envelope = unpack(pack(Envelope(head, body)))
    assert isinstance(error_from_reply(envelope), CatgaError)
    with contextlib.suppress(CatgaError):
        decode_reply(envelope, FuzzOrder.result_adapter())
