"""The wire envelope: messages, results and errors encoded and decoded."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter

from fastapi_catga import (
    CatgaError,
    Command,
    Event,
    HandlerNotFoundError,
    MessageTooLargeError,
    MessageValidationError,
    Query,
    RemoteHandlerError,
    RetryLater,
    exceptions,
)
from fastapi_catga.core.envelope import (
    ATTEMPT,
    DEADLINE,
    MESSAGE_ID,
    MESSAGE_TYPE,
    NODE,
    SOURCE,
    STATUS,
    Envelope,
    deadline_header,
    deadline_of,
    decode_message,
    decode_reply,
    encode_error,
    encode_message,
    encode_result,
    error_from_reply,
    pack,
    unpack,
)
from fastapi_catga.testing import memory_cluster
from tests.polling import eventually


class Item(BaseModel):
    sku: str
    quantity: int


class EReserve(Command[Item]):
    sku: str
    quantity: int


class ELookup(Query[Item | None]):
    sku: str


class EUploaded(Event):
    blob: str


TYPES: dict[str, Any] = {"EReserve": EReserve, "ELookup": ELookup, "EUploaded": EUploaded}


def all_error_classes() -> list[type[CatgaError]]:
    found: list[type[CatgaError]] = []
    todo: list[type[CatgaError]] = [CatgaError]
    while todo:
        cls = todo.pop()
        if cls.__module__ == exceptions.__name__:
            found.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(found, key=lambda cls: cls.__name__)


# -- messages --------------------------------------------------------------------------------------------


def test_message_round_trip_with_headers() -> None:
    message = EReserve(sku="apple", quantity=3)
    envelope = encode_message(message, source="node-a", max_payload=4096, attempt=2, deadline=1700000000.5)
    assert envelope.headers == {
        MESSAGE_ID: message.message_id,
        MESSAGE_TYPE: "EReserve",
        SOURCE: "node-a",
        ATTEMPT: "2",
        DEADLINE: "1700000000500",
    }
    decoded = decode_message(envelope, TYPES)
    assert type(decoded) is EReserve
    assert decoded == message


def test_event_round_trip_without_deadline() -> None:
    event = EUploaded(blob="x")
    envelope = encode_message(event, source="node-a", max_payload=4096)
    assert DEADLINE not in envelope.headers
    assert envelope.headers[ATTEMPT] == "1"
    assert decode_message(envelope, TYPES) == event


def test_size_bounds_the_packed_frame() -> None:
    for envelope in (
        Envelope({"ab": "cde"}, b"12345"),
        Envelope({}, b""),
        Envelope({"a": "b", "c": "d"}, b"x"),
    ):
        packed = pack(envelope)
        assert len(packed) <= envelope.size() <= len(packed) + 1
        assert unpack(packed) == envelope


@pytest.mark.parametrize("data", [b"", b"garbage", b"[1]\n{}", b"\xff\xfe\n"])
def test_unpack_refuses_what_is_no_frame(data: bytes) -> None:
    with pytest.raises(MessageValidationError, match="not a catga frame"):
        unpack(data)


def test_oversize_message_is_refused_with_its_size() -> None:
    with pytest.raises(MessageTooLargeError, match="over the 1024-byte payload limit") as info:
        encode_message(EUploaded(blob="x" * 2000), source="n", max_payload=1024)
    assert info.value.details["limit"] == 1024
    assert info.value.details["size"] > 2000
    assert isinstance(info.value, ValueError)


async def test_oversize_message_is_refused_before_anything_runs_or_travels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [name for name in os.environ if name.startswith("CATGA_")]:
        monkeypatch.delenv(name)  # settings come from the test, not the environment
    seen: list[str] = []

    async def on_upload(event: EUploaded) -> None:
        seen.append(event.blob[:1])

    async def reserve(command: EReserve) -> Item:
        seen.append(command.sku[:1])
        return Item(sku=command.sku, quantity=command.quantity)

    async with memory_cluster(2, handlers=[on_upload, reserve], max_payload=1024) as (first, second):
        await eventually(lambda: len(first.node.nodes()) == 2, within=5, message="nodes see each other")
        with pytest.raises(MessageTooLargeError):
            await first.mediator.publish(EUploaded(blob="x" * 2000))
        with pytest.raises(MessageTooLargeError):
            await first.mediator.send_to_node(EReserve(sku="y" * 2000, quantity=1), second.node.node_id)
        assert second.node.responder.stats["requests_handled"] == 0
        assert seen == []
        await first.mediator.publish(EUploaded(blob="small"))  # the cluster still works
        assert seen == ["s"]


def test_decode_of_an_unknown_type_is_handler_not_found() -> None:
    envelope = encode_message(EReserve(sku="a", quantity=1), source="n", max_payload=4096)
    with pytest.raises(HandlerNotFoundError, match="'EReserve'"):
        decode_message(envelope, {"ELookup": ELookup})
    with pytest.raises(MessageValidationError, match="no catga-type header"):
        decode_message(Envelope({}, b"{}"), TYPES)


def test_decode_of_bad_json_is_a_validation_error_with_details() -> None:
    envelope = Envelope({MESSAGE_TYPE: "EReserve"}, b"{not json")
    with pytest.raises(MessageValidationError, match="invalid EReserve: 1 validation error") as info:
        decode_message(envelope, TYPES)
    assert [error["type"] for error in info.value.details] == ["json_invalid"]


def test_decode_of_a_schema_invalid_body_lists_each_field() -> None:
    envelope = Envelope({MESSAGE_TYPE: "EReserve"}, b'{"message_id": "m", "quantity": "many"}')
    with pytest.raises(MessageValidationError) as info:
        decode_message(envelope, TYPES)
    details = info.value.details
    assert sorted((tuple(error["loc"]), error["type"]) for error in details) == [
        (("quantity",), "int_parsing"),
        (("sku",), "missing"),
    ]
    json.dumps(details)  # it travels in error replies and problem+json answers


# -- results -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [Item(sku="a", quantity=2), None])
def test_result_round_trip(value: Item | None) -> None:
    adapter = ELookup.result_adapter()
    envelope = encode_result(value, adapter, node_id="n2", max_payload=4096)
    assert envelope.headers == {STATUS: "ok", NODE: "n2"}
    assert decode_reply(envelope, adapter) == value


def test_result_that_does_not_match_the_result_type_is_a_validation_error() -> None:
    envelope = Envelope({STATUS: "ok", NODE: "n2"}, b'{"sku": "a"}')
    with pytest.raises(MessageValidationError, match="node n2 answered with a result") as info:
        decode_reply(envelope, EReserve.result_adapter())
    assert info.value.node_id == "n2"


def test_oversize_result_becomes_an_error_reply() -> None:
    adapter: TypeAdapter[Any] = TypeAdapter(str)
    envelope = encode_result("z" * 5000, adapter, node_id="n2", max_payload=1024)
    assert envelope.headers[STATUS] == "error"
    with pytest.raises(MessageTooLargeError, match="the result is") as info:
        decode_reply(envelope, adapter)
    assert info.value.node_id == "n2"


# -- errors ------------------------------------------------------------------------------------------------


def test_every_error_class_has_its_own_code() -> None:
    classes = all_error_classes()
    assert len(classes) >= 12
    assert len({cls.code for cls in classes}) == len(classes)
    for cls in classes:
        assert exceptions.error_class_for_code(cls.code) is cls


@pytest.mark.parametrize("cls", all_error_classes(), ids=lambda cls: cls.__name__)
def test_error_reply_round_trips_as_the_same_class(cls: type[CatgaError]) -> None:
    error = cls("it broke", details={"hint": [1, 2]})
    with pytest.raises(cls) as info:
        decode_reply(encode_error(error, node_id="n3"), TypeAdapter(int))
    assert type(info.value) is cls
    assert info.value.message == "it broke"
    assert info.value.node_id == "n3"
    assert info.value.details == {"hint": [1, 2]}
    assert info.value.retryable == cls.retryable


def test_remote_handler_error_keeps_its_type_and_retryable_flag() -> None:
    error = RemoteHandlerError("ValueError: no", error_type="ValueError", retryable=True)
    with pytest.raises(RemoteHandlerError) as info:
        decode_reply(encode_error(error, node_id="n4"), TypeAdapter(int))
    assert (info.value.error_type, info.value.retryable, info.value.node_id) == ("ValueError", True, "n4")


def test_error_reply_with_an_unknown_code_is_a_remote_handler_error() -> None:
    body = {"code": "out_of_stock", "message": "none left", "error_type": "OutOfStock", "retryable": False}
    envelope = Envelope({STATUS: "error", NODE: "n5"}, json.dumps(body).encode())
    with pytest.raises(RemoteHandlerError, match="none left") as info:
        decode_reply(envelope, TypeAdapter(int))
    assert type(info.value) is RemoteHandlerError
    assert info.value.error_type == "OutOfStock"


def test_unreadable_error_reply_is_a_remote_handler_error() -> None:
    with pytest.raises(RemoteHandlerError, match="node n6 sent an unreadable error reply"):
        decode_reply(Envelope({STATUS: "error", NODE: "n6"}, b"\x00garbage"), TypeAdapter(int))


# -- deadlines ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("headers", "deadline"), [({}, None), ({DEADLINE: "100500"}, 100.5)])
def test_deadline_of_reads_whole_milliseconds(headers: dict[str, str], deadline: float | None) -> None:
    assert deadline_of(Envelope(headers, b"{}")) == deadline


@pytest.mark.parametrize(
    "value",
    [
        "soon",
        "100.5",  # seconds with a fraction are not the wire format
        "-5",
        "9" * 400,  # int() takes it, the float division overflows
        ["100"],
        {"ms": 100},
        100500,  # a JSON number, not the string the wire carries
    ],
)
def test_a_deadline_that_is_no_whole_milliseconds_is_invalid(value: object) -> None:
    with pytest.raises(MessageValidationError, match="whole milliseconds"):
        deadline_of(Envelope({DEADLINE: value}, b"{}"))  # type: ignore[dict-item]


def test_deadline_header_round_trips_to_the_millisecond() -> None:
    header = deadline_header(1_700_000_000.1234)
    assert header == "1700000000123"
    assert deadline_of(Envelope({DEADLINE: header})) == 1_700_000_000.123


def test_an_error_over_the_payload_limit_still_makes_a_reply_that_fits() -> None:
    error = CatgaError("x" * 2_000_000, details={"rows": list(range(100_000))})
    reply = encode_error(error, node_id="n1", max_payload=64 * 1024)
    assert reply.size() < 64 * 1024
    with pytest.raises(CatgaError) as raised:
        decode_reply(reply, TypeAdapter(int))
    assert raised.value.message.startswith("x" * 1000 + "... (cut: 2000000 characters in all")
    assert raised.value.details is None
    assert len(encode_error(error, node_id="n1").body) > 2_000_000  # no limit given: all of it


class _Unreadable(CatgaError):
    def __init__(self) -> None:  # skips CatgaError.__init__: no message, no details
        pass


def test_an_error_that_cannot_be_encoded_is_still_answered_as_its_class() -> None:
    looped: dict[str, Any] = {}
    looped["self"] = looped
    for error, why in ((_Unreadable(), "AttributeError"), (CatgaError("loop", details=looped), "ValueError")):
        with pytest.raises(CatgaError) as raised:
            decode_reply(encode_error(error, node_id="n1"), TypeAdapter(int))
        assert type(raised.value) is type(error)
        assert raised.value.message == f"{type(error).__name__} (its error could not be encoded: {why})"


@pytest.mark.parametrize("limit", [1024, 4096])
@pytest.mark.parametrize("char", ["x", "ж", "🙂"])
def test_a_cut_error_reply_fits_whatever_its_characters(limit: int, char: str) -> None:
    reply = encode_error(CatgaError(char * 50_000), node_id="n1", max_payload=limit)
    assert reply.size() <= limit
    with pytest.raises(CatgaError, match="cut: 50000 characters in all"):
        decode_reply(reply, TypeAdapter(int))


@pytest.mark.parametrize(
    ("asked", "waits"),
    [(7.5, 7.5), (0, 0.0), (-5, 0.0), (float("nan"), 0.0), (1e12, 1e9), (float("inf"), 1e9), ("soon", 0.0)],
)
def test_a_retry_later_delay_crosses_as_the_wait_it_asks_for_at_most_the_longest(
    asked: Any, waits: float
) -> None:
    """A delay past the longest wait is the longest wait, not none: 1e12 s once meant "at once",
    and a durable message used up its attempts in seconds."""
    error = RetryLater("busy", delay=asked)
    back = error_from_reply(encode_error(error, node_id="n1"))
    assert isinstance(back, RetryLater) and back.delay == waits


def test_a_small_message_refused_for_the_room_kept_beside_it_says_so() -> None:
    """Under CATGA_MAX_PAYLOAD=1024 a durable message's dead-letter room alone is over the limit:
    the error tells the message's own size from what is kept, not one sum of both."""
    with pytest.raises(MessageTooLargeError) as info:
        encode_message(EUploaded(blob="x"), source="n", max_payload=1024, reserve=1100)
    own = int(str(info.value).split(" is ")[1].split(" bytes")[0])
    assert own < 200, str(info.value)
    assert "kept for headers added on the way and its dead letter" in str(info.value)
    assert info.value.details["size"] > 1024
