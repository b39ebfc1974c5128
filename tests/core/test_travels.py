"""`envelope.message_room`, as the in-process send uses it: a run here refuses exactly the messages
the wire refuses, ids and type names of any length, serializers of the type's own included."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import AliasChoices, Field, field_serializer

from fastapi_catga import Command, MessageTooLargeError
from fastapi_catga.core.envelope import PER_ATTEMPT, decode_body, encode_message, message_room, pack
from fastapi_catga.core.travels import body_of, reads_back_as_is

# What a message id may hold: anything but a control character (`MESSAGE_ID_PATTERN`) or a lone
# surrogate (a pattern is matched on UTF-8, which holds none).
ID_CHARACTERS = st.characters(exclude_characters=[*map(chr, range(32)), "\x7f"], exclude_categories=["Cs"])


class Mixed(Command[None]):
    text: str
    number: int
    ratio: float | None
    flag: bool
    label: str = Field(serialization_alias="a_much_longer_name_on_the_wire")


class Stretched(Command[None]):
    """Serialized its own way: each character of ``text`` becomes a hundred."""

    text: str

    @field_serializer("text")
    def _stretch(self, text: str) -> str:
        return text * 100


def wire_size(message: Any) -> int:
    """The size the wire checks a message at: its envelope and what each attempt adds."""
    return encode_message(message, source="n", max_payload=10**9).size() + PER_ATTEMPT


def refused(message: Any, max_payload: int) -> bool:
    """The in-process send's check (`Mediator.send`, `ClusterNode._local_route`)."""
    room = message_room(type(message), "n", max_payload)
    try:
        body = body_of(type(message))(message)
        if len(body) + 6 * len(message.message_id) > room:
            encode_message(message, source="n", max_payload=max_payload)
    except MessageTooLargeError:
        return True
    return False


@settings(max_examples=300, deadline=None)
@given(
    message_id=st.text(ID_CHARACTERS, min_size=1, max_size=200),  # a caller's own: emoji, surrogates
    text=st.text(max_size=300),
    number=st.integers(min_value=-(10**40), max_value=10**40),
    ratio=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    flag=st.booleans(),
    label=st.text(alphabet=st.characters(max_codepoint=127), max_size=50),
)
def test_a_message_is_refused_here_exactly_where_the_wire_refuses_it(
    message_id: str, text: str, number: int, ratio: float | None, flag: bool, label: str
) -> None:
    message = Mixed(message_id=message_id, text=text, number=number, ratio=ratio, flag=flag, label=label)
    envelope = encode_message(message, source="n", max_payload=10**9)
    assert envelope.size() == len(pack(envelope)), "size() is what the transports frame"
    size = wire_size(message)
    assert refused(message, size - 1), f"{size} bytes on the wire, yet taken under a {size - 1}-byte limit"
    assert not refused(message, size)


def test_a_type_serialized_its_own_way_is_always_encoded() -> None:
    message = Stretched(text="x" * 2000)  # 2,000 characters here, 200,000 on the wire
    assert wire_size(message) > 200_000
    assert refused(message, 64 * 1024)
    assert not refused(Stretched(text="x" * 20), 64 * 1024)


@pytest.mark.parametrize("text", ["plain", "ünïcödé", 'quotes " and \\ and \x00 controls'])
def test_small_messages_of_any_text_pass(text: str) -> None:
    assert not refused(Mixed(text=text, number=1, ratio=0.5, flag=True, label="l"), 1024)


def test_a_message_with_the_longest_id_and_a_long_type_name_is_refused_as_the_wire_refuses_it() -> None:
    class Long(Command[None]):
        type_name = "a." + "very-long-type-name." * 20
        text: str

    short_one = Long(message_id="i" * 200, text="")
    for text_size in range(900, 1100, 7):  # around a 2,048-byte limit, headers about 700 bytes of it
        message = Long(message_id="i" * 200, text="x" * text_size)
        size = wire_size(message)
        assert refused(message, size - 1) and not refused(message, size), text_size
    assert wire_size(short_one) > 640, "the headers and what an attempt adds are over the headroom"


class Plain(Command[None]):
    """Fields whose validated values read back from JSON as they are."""

    text: str
    count: int
    flag: bool
    note: str | None = None
    limit: int | None = Field(None, ge=0)


@settings(max_examples=300, deadline=None)
@given(
    message_id=st.text(ID_CHARACTERS, min_size=1, max_size=200),
    text=st.text(max_size=300),  # lone surrogates included: no JSON holds them, on any path
    count=st.integers(min_value=-(10**40), max_value=10**40),
    flag=st.booleans(),
    note=st.one_of(st.none(), st.text(max_size=20)),
    limit=st.one_of(st.none(), st.integers(min_value=0)),
)
def test_a_type_said_to_read_back_as_it_is_does(
    message_id: str, text: str, count: int, flag: bool, note: str | None, limit: int | None
) -> None:
    assert reads_back_as_is(Plain)
    message = Plain(message_id=message_id, text=text, count=count, flag=flag, note=note, limit=limit)
    try:
        body = body_of(Plain)(message)
    except ValueError:  # not JSON: refused alike here and on the wire (`encode_message`)
        return
    assert decode_body(Plain, body) == message


def test_types_that_json_may_change_are_read_back() -> None:
    class Aliased(Command[None]):
        user_id: int = Field(alias="userId")

    class Floating(Command[None]):
        ratio: float

    class Listed(Command[None]):
        items: list[int]

    class Chosen(Command[None]):  # AliasChoices: no hashable alias
        sku: str = Field(validation_alias=AliasChoices("sku", "SKU"))

    assert reads_back_as_is(Plain)
    for changed in (Mixed, Stretched, Aliased, Floating, Listed, Chosen):
        assert not reads_back_as_is(changed), changed
