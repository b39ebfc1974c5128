"""``@handler`` declarations and the `HandlerRegistry` built from modules, dotted names and functions."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
from pydantic import BaseModel

from fastapi_catga import Command, ConfigurationError, DuplicateHandlerError, Event, Message, Query, handler
from fastapi_catga.core.handlers import HandlerRegistry, check_type_name, declared_handlers
from tests.core import handlers_sample


class HGreet(Query[str]):
    name: str


class HShout(Command[str]):
    text: str


class HHappened(Event):
    what: str


class SameWireA(Command[None]):
    type_name: ClassVar[str] = "handlers.same"


class SameWireB(Command[None]):
    type_name: ClassVar[str] = "handlers.same"


class BadWireName(Command[None]):
    type_name: ClassVar[str] = "has space"


@handler
async def greet(query: HGreet) -> str:
    return f"hello {query.name}"


# Plain (undeclared) functions: registering them by function must not leave declarations behind
# that would clash in a registry built from every declared handler.
async def shout(command: HShout) -> str:
    return command.text.upper()


async def shout_again(command: HShout) -> str:
    return command.text


async def on_happened_1(event: HHappened) -> None:
    pass


async def on_happened_2(event: HHappened) -> None:
    pass


async def on_happened_3(event: HHappened) -> None:
    pass


async def on_same_a(command: SameWireA) -> None:
    pass


async def on_same_b(command: SameWireB) -> None:
    pass


async def on_bad_wire_name(command: BadWireName) -> None:
    pass


def qualified(func: Any) -> str:
    return f"{func.__module__}.{func.__qualname__}"


async def test_handler_reads_the_message_type_and_returns_the_function() -> None:
    specs = [spec for spec in declared_handlers() if spec.func is greet]
    assert [spec.message_type for spec in specs] == [HGreet]
    assert specs[0].name == qualified(greet)
    assert await greet(HGreet(name="ada")) == "hello ada"


def test_registry_from_a_declared_function() -> None:
    registry = HandlerRegistry.from_sources([greet])
    assert registry.requests[HGreet].func is greet
    assert registry.message_type("HGreet") is HGreet
    assert registry.message_type("Nope") is None


def test_non_async_function_is_refused_by_name() -> None:
    def sync_handler(query: HGreet) -> str:
        return query.name

    before = len(declared_handlers())
    with pytest.raises(ConfigurationError, match=r"sync_handler must be an 'async def' function"):
        handler(sync_handler)  # type: ignore[type-var]  # mypy refuses it too
    assert len(declared_handlers()) == before


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [
        (None, "annotate its first parameter with a Command, Query or Event subclass"),
        (int, r"annotate its first parameter .*got <class 'int'>"),
        (BaseModel, "annotate its first parameter"),
        (Query[str], r"Query\[str\] is a base class, not a message"),
        (Event, "Event is a base class, not a message: a handler of it would run only for that class"),
        (Command, "Command is a base class"),
        ("DoesNotExist", "cannot resolve its annotations"),
    ],
)
def test_missing_or_wrong_annotation_is_refused(annotation: Any, expected: str) -> None:
    async def bad(message):  # type: ignore[no-untyped-def]
        return None

    if annotation is not None:
        bad.__annotations__ = {"message": annotation}
    with pytest.raises(ConfigurationError, match=expected) as info:
        handler(bad)
    assert "bad" in str(info.value)


def test_handler_without_parameters_is_refused() -> None:
    async def nothing() -> None:
        return None

    with pytest.raises(ConfigurationError, match="must take the message as its first parameter"):
        handler(nothing)


class HTwo(Command[None]):
    pass


def test_handler_with_another_required_parameter_is_refused_at_registration() -> None:
    async def two(message: HTwo, session: object) -> None:
        return None

    async def fine(message: HTwo, session: object = None, *more: object, **extra: object) -> None:
        return None

    with pytest.raises(ConfigurationError, match=r"called with the message alone.*\(session\) defaults"):
        handler(two)
    HandlerRegistry.from_sources([fine])


def test_duplicate_request_handler_names_both_functions() -> None:
    with pytest.raises(DuplicateHandlerError) as info:
        HandlerRegistry.from_sources([shout, shout_again])
    message = str(info.value)
    assert qualified(shout) in message
    assert qualified(shout_again) in message
    assert "HShout" in message
    assert isinstance(info.value, ConfigurationError | ValueError)


def test_registering_one_handler_twice_is_not_a_duplicate() -> None:
    registry = HandlerRegistry.from_sources([shout, shout, handlers_sample, "tests.core.handlers_sample"])
    assert registry.requests[HShout].func is shout
    assert [spec.func for spec in registry.events[handlers_sample.SampleNoted]] == [
        handlers_sample.note_first,
        handlers_sample.note_second,
    ]


def test_many_event_handlers_are_kept_in_order() -> None:
    registry = HandlerRegistry.from_sources([on_happened_1, on_happened_2, on_happened_3])
    assert [spec.func for spec in registry.events[HHappened]] == [on_happened_1, on_happened_2, on_happened_3]
    assert HHappened not in registry.requests


def test_two_message_classes_with_one_type_name_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="share the wire name 'handlers.same'") as info:
        HandlerRegistry.from_sources([on_same_a, on_same_b])
    assert "SameWireA" in str(info.value)
    assert "SameWireB" in str(info.value)
    assert not isinstance(info.value, DuplicateHandlerError)


def test_type_name_with_bad_characters_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="'has space'"):
        HandlerRegistry.from_sources([on_bad_wire_name])


@pytest.mark.parametrize("name", ["has space", "trailing.newline\n", "a..b", ".a", "star.*", ""])
def test_check_type_name_takes_only_names_every_broker_carries(name: str) -> None:
    bad = type("Bad", (Command[str],), {"type_name": name})
    with pytest.raises(ConfigurationError, match="use letters, digits"):
        check_type_name(bad)


def test_from_sources_with_a_module_object() -> None:
    registry = HandlerRegistry.from_sources([handlers_sample])
    assert registry.requests[handlers_sample.SampleDouble].func is handlers_sample.double
    assert registry.requests[handlers_sample.SampleUpper].func is handlers_sample.upper
    assert len(registry.events[handlers_sample.SampleNoted]) == 2
    expected: set[type[Message]] = {handlers_sample.SampleDouble, handlers_sample.SampleUpper}
    assert set(registry.requests) == expected


def test_from_sources_with_a_dotted_module_name() -> None:
    registry = HandlerRegistry.from_sources(["tests.core.handlers_sample"])
    assert registry.requests[handlers_sample.SampleDouble].func is handlers_sample.double
    assert registry.message_type("SampleNoted") is handlers_sample.SampleNoted


def test_from_sources_module_and_a_clashing_function() -> None:
    with pytest.raises(DuplicateHandlerError, match="not_declared"):
        HandlerRegistry.from_sources([handlers_sample, handlers_sample.not_declared])


def test_from_sources_with_a_missing_module() -> None:
    with pytest.raises(ConfigurationError, match="cannot import handler module 'tests.core.no_such_module'"):
        HandlerRegistry.from_sources(["tests.core.no_such_module"])


def test_from_sources_with_only_a_function_takes_only_that_function() -> None:
    registry = HandlerRegistry.from_sources([handlers_sample.upper])
    assert set(registry.requests) == {handlers_sample.SampleUpper}
    assert not registry.events
