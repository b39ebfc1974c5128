"""Message base classes: wire names, ids, immutability and the result type each request carries."""

from __future__ import annotations

import json
import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Generic, TypeVar

import pytest
from pydantic import BaseModel, ValidationError

from fastapi_catga import Command, Event, IdempotencyBehavior, Message, Query, new_message_id
from fastapi_catga.core.envelope import MESSAGE_ID, decode_message, encode_message
from fastapi_catga.core.messages import R


class Order(BaseModel):
    order_id: str
    quantity: int


class PlaceOrder(Command[Order]):
    sku: str


class GetOrder(Query[Order | None]):
    order_id: str


class GetOrderV2(GetOrder):
    """A subclass of a concrete query keeps its parent's result type."""


class CountByType(Query[dict[str, int]]):
    pass


class Forget(Command[None]):
    pass


class Renamed(Command[str]):
    type_name: ClassVar[str] = "orders.renamed"


class RenamedChild(Renamed):
    """Does not set type_name: the wire name is never inherited."""


class OrderPlaced(Event):
    order_id: str


class Keyed(Command[None]):
    customer: str

    def routing_key(self) -> str:
        return self.customer


def test_type_name_defaults_to_the_class_name() -> None:
    assert PlaceOrder.type_name == "PlaceOrder"
    assert PlaceOrder(sku="a").type_name == "PlaceOrder"
    assert OrderPlaced.type_name == "OrderPlaced"
    assert GetOrderV2.type_name == "GetOrderV2"


def test_type_name_set_with_a_classvar_and_not_inherited() -> None:
    assert Renamed.type_name == "orders.renamed"
    assert Renamed().type_name == "orders.renamed"
    assert RenamedChild.type_name == "RenamedChild"


def test_type_name_is_not_a_field() -> None:
    assert "type_name" not in PlaceOrder.model_fields
    assert set(PlaceOrder(sku="a").model_dump()) == {"message_id", "sku"}


def test_message_id_is_generated_and_unique() -> None:
    first, second = PlaceOrder(sku="a"), PlaceOrder(sku="a")
    assert re.fullmatch(r"[0-9a-f]{32}", first.message_id)
    assert first.message_id != second.message_id
    assert new_message_id() != new_message_id()


def test_message_ids_stay_unique_across_reads_threads_and_a_fork() -> None:
    """Ids are read from os.urandom 256 at a time: none repeats across reads, threads, or in a
    forked child (which must not hand out what its parent read ahead)."""
    ids = [new_message_id() for _ in range(1000)]
    with ThreadPoolExecutor(4) as pool:
        ids += [
            i for batch in pool.map(lambda _: [new_message_id() for _ in range(500)], range(8)) for i in batch
        ]
    new_message_id()  # the parent now holds ids read ahead
    reader, writer = os.pipe()
    with warnings.catch_warnings():  # 3.12+ warns of forking with threads; the child only writes
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: its next ids, then out at once
        os.write(writer, " ".join(new_message_id() for _ in range(10)).encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(pid, 0)
    with os.fdopen(reader) as pipe:
        child = pipe.read().split()
    parent = [new_message_id() for _ in range(10)]
    every = ids + child + parent
    assert len(child) == 10
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in every)
    assert len(set(every)) == len(every)


def test_message_id_is_kept_when_given_and_survives_the_wire() -> None:
    message = PlaceOrder(sku="a", message_id="client-key-1")
    assert message.message_id == "client-key-1"
    envelope = encode_message(message, source="n1", max_payload=4096)
    assert envelope.headers[MESSAGE_ID] == "client-key-1"
    assert decode_message(envelope, {"PlaceOrder": PlaceOrder}) == message
    assert message.model_copy().message_id == "client-key-1"


def test_empty_message_id_is_rejected() -> None:
    with pytest.raises(ValidationError, match="message_id"):
        PlaceOrder(sku="a", message_id="")


@pytest.mark.parametrize(
    "given", ["a\nFAKE LOG LINE", "\x1b[31mred", "tab\there", "nul\x00", "del\x7f", "lone \ud800"]
)
def test_a_message_id_with_a_control_character_is_rejected(given: str) -> None:
    """A client's id goes into log lines, terminals (the CLI) and URLs (the admin routes) as it is."""
    with pytest.raises(ValidationError, match="message_id"):
        PlaceOrder(sku="a", message_id=given)
    with pytest.raises(ValidationError, match="message_id"):
        PlaceOrder.model_validate_json(f'{{"sku":"a","message_id":{json.dumps(given)}}}')
    assert PlaceOrder(sku="a", message_id="ünïcode / 200 % ok").message_id == "ünïcode / 200 % ok"


async def test_message_id_is_the_idempotency_key() -> None:
    runs: list[str] = []

    async def handle(message: PlaceOrder) -> Order:
        runs.append(message.sku)
        return Order(order_id=message.message_id, quantity=len(runs))

    behavior = IdempotencyBehavior()
    first = PlaceOrder(sku="first", message_id="same")
    retry = PlaceOrder(sku="retry", message_id="same")
    other = PlaceOrder(sku="other")

    assert await behavior(first, lambda: handle(first)) == Order(order_id="same", quantity=1)
    assert await behavior(retry, lambda: handle(retry)) == Order(order_id="same", quantity=1)
    await behavior(other, lambda: handle(other))
    assert runs == ["first", "other"]


def test_messages_are_frozen_and_hashable() -> None:
    message = PlaceOrder(sku="a", message_id="m1")
    with pytest.raises(ValidationError, match="frozen"):
        message.sku = "b"  # type: ignore[misc]
    assert message.sku == "a"
    assert hash(message) == hash(PlaceOrder(sku="a", message_id="m1"))


def test_result_adapter_validates_a_model_result() -> None:
    adapter = PlaceOrder.result_adapter()
    assert adapter.validate_python({"order_id": "o1", "quantity": "2"}) == Order(order_id="o1", quantity=2)
    with pytest.raises(ValidationError):
        adapter.validate_python({"order_id": "o1"})
    assert PlaceOrder.result_adapter() is adapter


@pytest.mark.parametrize("query_type", [GetOrder, GetOrderV2])
def test_result_adapter_validates_an_optional_result(query_type: type[GetOrder]) -> None:
    adapter = query_type.result_adapter()
    assert adapter.validate_json(b"null") is None
    order = Order(order_id="o1", quantity=1)
    assert adapter.validate_json(adapter.dump_json(order)) == order
    with pytest.raises(ValidationError):
        adapter.validate_python("not an order")


def test_result_adapter_validates_a_dict_result() -> None:
    adapter = CountByType.result_adapter()
    assert adapter.validate_python({"a": "1"}) == {"a": 1}
    with pytest.raises(ValidationError):
        adapter.validate_python({"a": "many"})


def test_result_adapter_validates_a_none_result() -> None:
    adapter = Forget.result_adapter()
    assert adapter.validate_json(b"null") is None
    with pytest.raises(ValidationError):
        adapter.validate_python(1)


T = TypeVar("T")
U = TypeVar("U")


class Page(BaseModel, Generic[T]):
    items: list[T]


class Paged(Query[Page[T]], Generic[T]):
    """A generic base that puts its own type argument inside the result type."""


class ListOrders(Paged[Order]):
    pass


class Batch(Command[list[T]], Generic[T]):
    pass


class Relayed(Batch[U], Generic[U]):
    """A type variable handed on through a second generic base."""


class RelayedInts(Relayed[int]):
    pass


class Unbound(Batch[U], Generic[U]):
    pass


def test_result_adapter_fills_a_generic_base_in() -> None:
    page = ListOrders.result_adapter().validate_python({"items": [{"order_id": "o1", "quantity": "2"}]})
    assert page == Page[Order](items=[Order(order_id="o1", quantity=2)])
    with pytest.raises(ValidationError):  # not the bare type argument
        ListOrders.result_adapter().validate_python({"order_id": "o1", "quantity": 2})
    assert RelayedInts.result_adapter().validate_python(["1", 2]) == [1, 2]
    with pytest.raises(ValidationError):
        RelayedInts.result_adapter().validate_python(1)


class Tagged(BaseModel, Generic[T]):
    tag: T | None = None


class MyQuery(Query[R], Generic[R]):
    """A generic base written with the library's own type variable."""


class GetCount(MyQuery[int]):
    pass


class Mixed(Tagged[str], Query[list[T]], Generic[T]):
    """A mixin that uses the same type variable name for another thing."""


class MixedOrders(Mixed[Order]):
    pass


def test_result_adapter_fills_in_each_base_with_its_own_arguments() -> None:
    assert GetCount.result_adapter().validate_python("3") == 3
    with pytest.raises(ValidationError):
        GetCount.result_adapter().validate_python("three")
    orders = MixedOrders.result_adapter().validate_python([{"order_id": "o1", "quantity": 1}])
    assert orders == [Order(order_id="o1", quantity=1)]


def test_result_adapter_of_a_base_left_open_takes_anything() -> None:
    anything: Any = object()
    assert Unbound.result_adapter().validate_python(anything) is anything


def test_events_carry_no_result() -> None:
    assert not hasattr(OrderPlaced, "result_adapter")
    assert issubclass(OrderPlaced, Message)


@pytest.mark.parametrize("message", [PlaceOrder(sku="a"), OrderPlaced(order_id="o1"), Forget()])
def test_routing_key_defaults_to_none(message: Message) -> None:
    assert message.routing_key() is None


def test_routing_key_can_be_overridden() -> None:
    assert Keyed(customer="c-7").routing_key() == "c-7"


def test_message_id_keeps_its_wire_name_under_an_alias_generator() -> None:
    """``to_camel`` would write it ``messageId``: a node of another version would read no id and
    make a new one, and a retry would not be the same send."""
    from pydantic import ConfigDict, Field
    from pydantic.alias_generators import to_camel

    class Camel(Command[str]):
        model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)
        order_no: int = 1

    sent = Camel(order_no=2)
    wire = json.loads(sent.model_dump_json(by_alias=True))
    assert wire == {"message_id": sent.message_id, "orderNo": 2}
    with pytest.raises(TypeError, match="must keep its wire name 'message_id'"):

        class Renamed(Command[str]):
            message_id: str = Field(default="x", alias="id")


def test_a_message_whose_fields_take_alias_choices_is_a_message() -> None:
    from pydantic import AliasChoices, Field

    class Chosen(Command[str]):
        sku: str = Field(validation_alias=AliasChoices("sku", "SKU"))

    assert Chosen.model_validate({"SKU": "a"}).sku == "a"
