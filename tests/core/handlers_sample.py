"""Handlers registered by module in the tests: by module object, by dotted name, by CATGA_HANDLER_MODULES."""

from __future__ import annotations

from fastapi_catga import Command, Event, Query, handler


class SampleDouble(Query[int]):
    value: int


class SampleUpper(Command[str]):
    text: str


class SampleNoted(Event):
    note: str


#: What the event handlers saw, in order.
notes: list[str] = []


@handler
async def double(query: SampleDouble) -> int:
    return query.value * 2


@handler
async def upper(command: SampleUpper) -> str:
    return command.text.upper()


@handler
async def note_first(event: SampleNoted) -> None:
    notes.append(f"first:{event.note}")


@handler
async def note_second(event: SampleNoted) -> None:
    notes.append(f"second:{event.note}")


async def not_declared(query: SampleDouble) -> int:
    """Not decorated: registering the module must not pick it up."""
    return -1
