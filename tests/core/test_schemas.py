"""The compatibility rule of rolling upgrades: one version's message against another's."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import ClassVar

import pytest
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, computed_field

from fastapi_catga import Command, Event, Message, NodeInfo, Query
from fastapi_catga.core.schemas import Shape, TypeSchema, advertised, problems, schema_of


def schema(message_type: type[Message]) -> TypeSchema:
    found = schema_of(message_type)
    assert found is not None
    return found


def between(writer: type[Message], reader: type[Message]) -> list[str]:
    """What keeps a node with ``writer`` from sending to a node with ``reader`` (its peer, "b")."""
    return problems(schema(writer), schema(reader), "node b")


class Line(BaseModel):
    sku: str
    qty: int


class Receipt(BaseModel):
    order_id: str
    total: float


class PlaceV1(Command[Receipt]):
    type_name: ClassVar[str] = "orders.place"
    customer: str
    lines: list[Line]


class PlaceV1Documented(Command[Receipt]):
    """Same wire shape, another docstring, descriptions and titles."""

    type_name: ClassVar[str] = "orders.place"
    customer: str = Field(description="who orders", title="Customer")
    lines: list[Line] = Field(examples=[[{"sku": "a", "qty": 1}]])


class PlaceOptional(Command[Receipt]):  # v2: an added field with a default
    type_name: ClassVar[str] = "orders.place"
    customer: str
    lines: list[Line]
    note: str | None = None


class PlaceRequired(Command[Receipt]):  # v2: an added required field
    type_name: ClassVar[str] = "orders.place"
    customer: str
    lines: list[Line]
    priority: int


class PlaceRenamed(Command[Receipt]):  # v2: customer renamed to buyer
    type_name: ClassVar[str] = "orders.place"
    buyer: str
    lines: list[Line]


class PlaceRetyped(Command[Receipt]):  # v2: customer is now an int
    type_name: ClassVar[str] = "orders.place"
    customer: int
    lines: list[Line]


class LineV2(BaseModel):
    sku: str
    qty: float  # a nested change


class PlaceNested(Command[Receipt]):
    type_name: ClassVar[str] = "orders.place"
    customer: str
    lines: list[LineV2]


class ReceiptSlim(BaseModel):
    order_id: str


class PlaceSlimResult(Command[ReceiptSlim]):  # v2: the result lost a required field
    type_name: ClassVar[str] = "orders.place"
    customer: str
    lines: list[Line]


class PlaceStrict(Command[Receipt]):  # extra="forbid": refuses fields it does not know
    model_config = ConfigDict(extra="forbid")
    type_name: ClassVar[str] = "orders.place"
    customer: str
    lines: list[Line]


def test_the_same_schema_has_the_same_fingerprint_whatever_its_notes() -> None:
    assert schema(PlaceV1Documented).fingerprint == schema(PlaceV1).fingerprint
    assert between(PlaceV1, PlaceV1Documented) == []
    assert len(schema(PlaceV1).fingerprint) == 12


def test_an_added_optional_field_is_compatible_both_ways() -> None:
    assert schema(PlaceOptional).fingerprint != schema(PlaceV1).fingerprint
    assert between(PlaceV1, PlaceOptional) == []
    assert between(PlaceOptional, PlaceV1) == []


def test_an_added_required_field_cannot_be_sent_by_the_old_version() -> None:
    assert between(PlaceV1, PlaceRequired) == [
        "message field 'priority': required on node b, absent on this node"
    ]
    assert between(PlaceRequired, PlaceV1) == []  # the old one ignores the field it does not know


class PlaceWritesBuyer(Command[Receipt]):  # v2: reads both names, writes the new one only
    type_name: ClassVar[str] = "orders.place"
    customer: str = Field(validation_alias=AliasChoices("customer", "buyer"), serialization_alias="buyer")
    lines: list[Line]


class PlaceDropsLines(Command[Receipt]):  # v2: reads lines, never writes them
    type_name: ClassVar[str] = "orders.place"
    customer: str
    lines: list[Line] = Field(default_factory=list, exclude=True)


class PlaceComputes(Command[Receipt]):  # v2: writes a computed field too
    type_name: ClassVar[str] = "orders.place"
    customer: str
    lines: list[Line]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def size(self) -> int:
        return len(self.lines)


class PlaceV1Sized(Command[Receipt]):  # v1 with a plain field that v2 computes
    type_name: ClassVar[str] = "orders.place"
    customer: str
    lines: list[Line]
    size: int = 0


class PlaceV1Priced(Command[Receipt]):
    type_name: ClassVar[str] = "orders.place"
    customer: str
    lines: list[Line]
    amount: Decimal


class PlaceRenamesPrice(Command[Receipt]):  # v2: reads "total", writes it as v1's "amount"
    type_name: ClassVar[str] = "orders.place"
    customer: str
    lines: list[Line]
    total: Decimal = Field(serialization_alias="amount")


def test_a_field_written_under_another_name_keeps_its_type_and_a_computed_one_its_own() -> None:
    """No false "type differs" (a rollout would refuse sends that work): a Decimal's serialization
    schema is a string, its validation one a number or string; a computed field is read-only."""
    assert between(PlaceRenamesPrice, PlaceV1Priced) == []
    assert between(PlaceComputes, PlaceV1Sized) == []


def test_a_record_of_a_later_version_with_more_parts_is_read() -> None:
    text = schema(PlaceComputes).text
    assert TypeSchema.decode(text + "|something-new") == schema(PlaceComputes)


def test_what_a_version_writes_is_checked_against_what_the_other_reads() -> None:
    """A field written under another name, or not written, or written only: the schema it reads
    is the same as the old version's, and the old version cannot read what it writes."""
    assert between(PlaceWritesBuyer, PlaceV1) == [
        "message field 'customer': required on node b, absent on this node"
    ]
    assert between(PlaceV1, PlaceWritesBuyer) == []  # it reads "customer" still
    assert between(PlaceDropsLines, PlaceV1) == [
        "message field 'lines': required on node b, absent on this node"
    ]
    assert between(PlaceComputes, PlaceV1) == []  # a field it does not know is ignored
    assert between(PlaceComputes, PlaceStrict) == [
        "message field 'size': sent by this node, forbidden on node b (extra='forbid')"
    ]
    for writer in (PlaceWritesBuyer, PlaceDropsLines, PlaceComputes):  # the record carries both
        assert TypeSchema.decode(schema(writer).text) == schema(writer)
    assert schema(PlaceV1).text.count("|") == 2, "a type that writes what it reads: the record as before"


def test_a_renamed_required_field_is_incompatible_both_ways() -> None:
    assert between(PlaceV1, PlaceRenamed) == [
        "message field 'buyer': required on node b, absent on this node"
    ]
    assert between(PlaceRenamed, PlaceV1) == [
        "message field 'customer': required on node b, absent on this node"
    ]


def test_a_changed_field_type_is_incompatible_nested_models_included() -> None:
    expected = ["message field 'customer': its type differs between node b and this node"]
    assert between(PlaceV1, PlaceRetyped) == expected
    assert between(PlaceRetyped, PlaceV1) == expected
    assert between(PlaceV1, PlaceNested) == [
        "message field 'lines': its type differs between node b and this node"
    ]


def test_a_result_is_read_by_the_sender() -> None:
    # b returns a receipt without `total`, which this node requires: b may not run it for us.
    assert between(PlaceV1, PlaceSlimResult) == [
        "result field 'total': required on this node, absent on node b"
    ]
    assert between(PlaceSlimResult, PlaceV1) == []  # the slim reader ignores `total`


def test_a_reader_that_forbids_extra_fields_takes_no_new_field() -> None:
    assert between(PlaceOptional, PlaceStrict) == [
        "message field 'note': sent by this node, forbidden on node b (extra='forbid')"
    ]
    assert between(PlaceStrict, PlaceOptional) == []


class CountV1(Query[int]):
    type_name: ClassVar[str] = "count"


class CountV2(Query[str]):
    type_name: ClassVar[str] = "count"


class OptionalCount(Query[int | None]):
    type_name: ClassVar[str] = "count"


def test_a_result_that_is_not_a_model_compares_as_a_whole() -> None:
    assert schema(CountV1).result == Shape(value=schema(CountV1).result.value)  # type: ignore[union-attr]
    assert between(CountV1, CountV2) == ["result type differs between this node and node b"]
    assert between(CountV1, OptionalCount) == ["result type differs between this node and node b"]


class ShippedV1(Event):
    type_name: ClassVar[str] = "orders.shipped"
    order_id: str


class ShippedV2(Event):
    type_name: ClassVar[str] = "orders.shipped"
    order_id: str
    carrier: str


def test_events_compare_their_message_only() -> None:
    assert schema(ShippedV1).result is None
    assert between(ShippedV1, ShippedV2) == [
        "message field 'carrier': required on node b, absent on this node"
    ]
    assert between(ShippedV2, ShippedV1) == []


class Odd(Command[None]):
    model_config = ConfigDict(populate_by_name=True)
    type_name: ClassVar[str] = "odd"
    weird: str = Field(alias="a,b:c|d?e=!f%")
    plain: int = 0


def test_the_record_string_round_trips_any_field_name() -> None:
    odd = schema(Odd)
    assert TypeSchema.decode(odd.text) == odd
    assert set(odd.message.fields or {}) == {"a,b:c|d?e=!f%", "plain"}
    assert odd.message.fields["plain"][1] is False  # type: ignore[index]


@pytest.mark.parametrize("text", ["", "abc", "abc|x", "|a:1|", "abc|:12|", "abc|name:|"])
def test_a_record_string_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        TypeSchema.decode(text)


def make_types(count: int) -> list[type[Command[Receipt]]]:
    """``count`` distinct commands of a typical size: five fields, a model result."""
    return [
        type(
            f"Op{i}",
            (Command[Receipt],),
            {
                "__annotations__": {
                    "customer_id": str,
                    "order_id": str,
                    "lines": list[Line],
                    "note": "str | None",
                    "requested_at": float,
                },
                "note": None,
                "__module__": __name__,
            },
        )
        for i in range(count)
    ]


def test_the_membership_record_of_an_app_with_20_types_stays_small() -> None:
    types = make_types(20)
    bare = NodeInfo(node_id="orders-7f3a9c1e", handles=sorted(t.type_name for t in types))
    full = bare.model_copy(update={"schemas": {t.type_name: schema(t).text for t in types}})
    size, before = len(full.model_dump_json()), len(bare.model_dump_json())
    per_type = (size - before) / 20
    print(f"record: {before} B without schemas, {size} B with 20 types ({per_type:.0f} B per type)")
    assert per_type < 150
    assert size < 3500
    sample = json.loads(full.model_dump_json())["schemas"]["Op0"]
    assert sample.count("|") == 2 and "note?:" in sample


class Opaque:
    pass


class Carries(Command[int]):
    model_config = ConfigDict(arbitrary_types_allowed=True)
    thing: Opaque | None = None


def test_a_type_without_a_json_schema_is_not_advertised_nor_compared() -> None:
    assert schema_of(Carries) is None
    assert advertised([Carries, PlaceV1]) == {"orders.place": schema(PlaceV1).text}
