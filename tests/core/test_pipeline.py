"""`build_pipeline`: behaviors composed once per handler, as an onion, first outermost."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from fastapi_catga import CallNext, Catga, CatgaSettings, Message, PipelineBehavior, build
from fastapi_catga.core.pipeline import build_pipeline
from fastapi_catga.testing import InMemoryTransport
from tests.core.pipeline_sample import Counter, POther, PPing, echo, other


class Marker:
    """Records before/after around the rest of the pipeline and wraps the result in its name."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    async def __call__(self, message: Message, call_next: CallNext) -> Any:
        self.log.append(f"{self.name}:before")
        result = await call_next()
        self.log.append(f"{self.name}:after")
        return f"{self.name}({result})"


class OnlyFor:
    """Applies to one message type; counts how often it is asked and how often it runs."""

    def __init__(self, wanted: type[Message]) -> None:
        self.wanted = wanted
        self.asked: list[type[Message]] = []
        self.runs = 0

    def applies_to(self, message_type: type[Message]) -> bool:
        self.asked.append(message_type)
        return message_type is self.wanted

    async def __call__(self, message: Message, call_next: CallNext) -> Any:
        self.runs += 1
        return await call_next()


async def test_behaviors_compose_as_an_onion_first_outermost() -> None:
    log: list[str] = []

    async def handle(message: PPing) -> str:
        log.append("handler")
        return "h"

    pipeline = build_pipeline(handle, [Marker("a", log), Marker("b", log)], PPing)
    assert await pipeline(PPing()) == "a(b(h))"
    assert log == ["a:before", "b:before", "handler", "b:after", "a:after"]


def test_no_behaviors_gives_the_handler_itself() -> None:
    assert build_pipeline(echo, [], PPing) is echo
    assert build_pipeline(echo, [OnlyFor(POther)], PPing) is echo


async def test_behavior_that_does_not_apply_is_skipped_and_asked_once() -> None:
    log: list[str] = []
    skipped, applied = OnlyFor(POther), OnlyFor(PPing)
    pipeline = build_pipeline(echo, [skipped, Marker("m", log), applied], PPing)
    for _ in range(3):
        assert await pipeline(PPing()) == "m(handled ping)"
    assert skipped.asked == [PPing]
    assert applied.asked == [PPing]
    assert (skipped.runs, applied.runs) == (0, 3)


async def test_behavior_may_short_circuit_or_call_next_twice() -> None:
    calls = Counter(result="r")

    class Cached:
        async def __call__(self, message: Message, call_next: CallNext) -> Any:
            return "cached"

    class Twice:
        async def __call__(self, message: Message, call_next: CallNext) -> Any:
            return [await call_next(), await call_next()]

    assert isinstance(Cached(), PipelineBehavior)
    assert await build_pipeline(calls, [Cached()], PPing)(PPing()) == "cached"
    assert calls.calls == 0
    assert await build_pipeline(calls, [Twice()], PPing)(PPing()) == ["r", "r"]
    assert calls.calls == 2


@pytest.fixture
async def node_with_only_for(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Catga, OnlyFor]]:
    for name in [name for name in os.environ if name.startswith("CATGA_")]:
        monkeypatch.delenv(name)  # settings come from the test, not the environment
    only = OnlyFor(POther)
    catga = build(
        CatgaSettings(node_id="pipeline-node"),
        handlers=[echo, other],
        behaviors=[only],
        transport=InMemoryTransport(),
    )
    await catga.start()
    try:
        yield catga, only
    finally:
        await catga.stop()


async def test_pipelines_are_built_once_per_handler_not_per_message(
    node_with_only_for: tuple[Catga, OnlyFor],
) -> None:
    catga, only = node_with_only_for
    assert sorted(t.type_name for t in only.asked) == ["POther", "PPing"]
    for _ in range(3):
        assert await catga.mediator.send(PPing()) == "handled ping"
        assert await catga.mediator.send(POther()) == "other"
    assert len(only.asked) == 2
    assert only.runs == 3
