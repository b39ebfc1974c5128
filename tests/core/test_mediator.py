"""The mediator on a single in-memory node: send, publish, broadcast and the node queries."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC
from typing import Any

import pytest

import fastapi_catga
import fastapi_catga.testing
from fastapi_catga import (
    Catga,
    CatgaSettings,
    Command,
    Event,
    HandlerNotFoundError,
    MessageValidationError,
    NodeUnavailableError,
    Query,
    RemoteHandlerError,
    RequestTimeoutError,
    TransportError,
)
from fastapi_catga.testing import InMemoryBroker, InMemoryTransport
from tests.polling import eventually

NODE_ID = "solo-node"


class MAdd(Query[int]):
    a: int
    b: int


class MExplode(Command[None]):
    pass


class MRefuse(Command[None]):
    pass


class MStuck(Query[str]):
    pass


class MUnhandled(Query[int]):
    pass


class MSlow(Query[str]):
    pass


class MNoticed(Event):
    what: str


noticed: list[str] = []


async def add(query: MAdd) -> int:
    return query.a + query.b


async def explode(command: MExplode) -> None:
    raise ValueError("kaboom")


async def refuse(command: MRefuse) -> None:
    raise MessageValidationError("quantity must be positive", details=[{"loc": ["quantity"]}])


async def stuck(query: MStuck) -> str:
    await asyncio.Event().wait()
    return "never"


slow_runs: list[float] = []


async def slow(query: MSlow) -> str:
    slow_runs.append(time.perf_counter())
    await asyncio.sleep(0.4)  # stands for 0.4 s of work
    return "done"


async def notice_first(event: MNoticed) -> None:
    noticed.append(f"first:{event.what}")


async def notice_broken(event: MNoticed) -> None:
    raise RuntimeError("this handler always fails")


async def notice_last(event: MNoticed) -> None:
    noticed.append(f"last:{event.what}")


@pytest.fixture
def broker() -> InMemoryBroker:
    return InMemoryBroker()


@pytest.fixture
async def catga(monkeypatch: pytest.MonkeyPatch, broker: InMemoryBroker) -> AsyncIterator[Catga]:
    for name in [name for name in os.environ if name.startswith("CATGA_")]:
        monkeypatch.delenv(name)
    noticed.clear()
    slow_runs.clear()
    node = fastapi_catga.build(
        CatgaSettings(node_id=NODE_ID, endpoint="http://solo:8000", metadata={"zone": "z1"}),
        handlers=[add, explode, refuse, stuck, slow, notice_first, notice_broken, notice_last],
        transport=InMemoryTransport(broker),
    )
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


@pytest.mark.parametrize("timeout", [None, 5.0])
async def test_send_returns_the_result(catga: Catga, timeout: float | None) -> None:
    assert await catga.mediator.send(MAdd(a=2, b=3), timeout=timeout) == 5


@pytest.mark.parametrize("timeout", [None, 5.0])
async def test_handler_exception_becomes_remote_handler_error(catga: Catga, timeout: float | None) -> None:
    message = MExplode()
    with pytest.raises(RemoteHandlerError, match="MExplode handler raised ValueError on node") as info:
        await catga.mediator.send(message, timeout=timeout)
    assert message.message_id in str(info.value)
    assert "kaboom" not in str(info.value), "the handler's text stays in this node's log"
    assert info.value.error_type == "ValueError"
    assert info.value.node_id == NODE_ID
    assert isinstance(info.value.__cause__, ValueError)
    assert str(info.value.__cause__) == "kaboom"


@pytest.mark.parametrize("timeout", [None, 5.0])
async def test_catga_error_from_a_handler_keeps_its_class(catga: Catga, timeout: float | None) -> None:
    with pytest.raises(MessageValidationError, match="quantity must be positive") as info:
        await catga.mediator.send(MRefuse(), timeout=timeout)
    assert type(info.value) is MessageValidationError
    assert info.value.details == [{"loc": ["quantity"]}]


@pytest.mark.parametrize(
    "timeout",
    [
        None,
        5.0,
    ],
)
async def test_catga_error_from_a_handler_names_the_node(catga: Catga, timeout: float | None) -> None:
    with pytest.raises(MessageValidationError) as info:
        await catga.mediator.send(MRefuse(), timeout=timeout)
    assert info.value.node_id == NODE_ID


async def test_send_of_an_event_is_a_validation_error(catga: Catga) -> None:
    event: Any = MNoticed(what="x")
    with pytest.raises(MessageValidationError, match="send\\(\\) takes a Command or Query, not MNoticed"):
        await catga.mediator.send(event)
    assert noticed == []


async def test_publish_of_a_command_is_a_validation_error(catga: Catga) -> None:
    command: Any = MAdd(a=1, b=1)
    with pytest.raises(MessageValidationError, match="publish\\(\\) takes an Event"):
        await catga.mediator.publish(command)


async def test_send_of_an_unhandled_query_fails_fast(catga: Catga) -> None:
    started = time.perf_counter()
    with pytest.raises(HandlerNotFoundError, match="MUnhandled"):
        await catga.mediator.send(MUnhandled())
    assert time.perf_counter() - started < 0.5


async def test_publish_runs_every_event_handler_despite_one_failing(
    catga: Catga, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="fastapi_catga")
    await catga.mediator.publish(MNoticed(what="hello"))
    assert noticed == ["first:hello", "last:hello"]
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "notice_broken" in record.getMessage()
    assert "MNoticed" in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


async def test_publish_of_an_event_nobody_handles_is_fine(catga: Catga) -> None:
    class MIgnored(Event):
        pass

    await catga.mediator.publish(MIgnored())


async def test_send_with_a_timeout_on_a_slow_handler(catga: Catga) -> None:
    started = time.perf_counter()
    with pytest.raises(RequestTimeoutError) as info:
        await catga.mediator.send(MStuck(), timeout=0.05)
    assert time.perf_counter() - started < 1.0
    assert isinstance(info.value, TimeoutError)


async def test_send_with_a_timeout_gives_a_local_handler_the_whole_budget(catga: Catga) -> None:
    try:
        assert await catga.mediator.send(MSlow(), timeout=1.0) == "done"
    finally:
        assert len(slow_runs) == 1, f"the handler ran {len(slow_runs)} times"


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), 1e12, "5", True])
async def test_a_timeout_no_deadline_header_can_carry_is_refused_on_every_path(
    catga: Catga, broker: InMemoryBroker, timeout: Any
) -> None:
    """Alone as with another node: an infinite or vast timeout is no deadline another node reads;
    a route that passes its client's timeout on answers 422 (a `CatgaError`), not 500."""
    with pytest.raises(MessageValidationError, match="timeout must be positive seconds, at most 1e"):
        await catga.mediator.send(MAdd(a=1, b=2), timeout=timeout)
    other = fastapi_catga.testing.memory_node(broker, handlers=[add], node_id="other")
    await other.start()
    try:
        await eventually(lambda: len(catga.node.nodes()) == 2, within=2)
        for send in (
            catga.mediator.send_to_node(MAdd(a=1, b=2), "other", timeout=timeout),
            catga.mediator.broadcast(MAdd(a=1, b=2), timeout=timeout),
        ):
            with pytest.raises(MessageValidationError, match="timeout must be positive seconds, at most 1e"):
                await send
    finally:
        await other.stop()


@pytest.mark.parametrize("message", [None, {"a": 1}, MAdd, "MAdd"])
async def test_sending_what_is_no_message_is_a_validation_error(catga: Catga, message: Any) -> None:
    for send in (catga.mediator.send, lambda m: catga.mediator.send_to_node(m, NODE_ID)):
        with pytest.raises(MessageValidationError, match="send\\(\\) takes a Command or Query"):
            await send(message)


async def test_broadcast_on_one_node(catga: Catga) -> None:
    assert await catga.mediator.broadcast(MAdd(a=20, b=22)) == {NODE_ID: 42}
    answers = await catga.mediator.broadcast(MExplode())
    assert list(answers) == [NODE_ID]
    assert isinstance(answers[NODE_ID], RemoteHandlerError)


async def test_send_to_node(catga: Catga) -> None:
    assert await catga.mediator.send_to_node(MAdd(a=1, b=1), NODE_ID) == 2
    for no_id in (None, "", 7):  # None meant "any node" further down: a bug would send it anywhere
        with pytest.raises(MessageValidationError, match="takes a node id"):
            await catga.mediator.send_to_node(MAdd(a=1, b=1), no_id)  # type: ignore[arg-type]
    with pytest.raises(NodeUnavailableError, match="'elsewhere' is unknown or dead"):
        await catga.mediator.send_to_node(MAdd(a=1, b=1), "elsewhere")
    with pytest.raises(HandlerNotFoundError):
        await catga.mediator.send_to_node(MUnhandled(), NODE_ID)


async def test_get_nodes_and_current_node(catga: Catga) -> None:
    current = await catga.mediator.get_current_node()
    assert await catga.mediator.get_nodes() == [current]
    assert current.node_id == NODE_ID
    assert current.endpoint == "http://solo:8000"
    assert current.metadata == {"zone": "z1"}
    assert current.handles == ["MAdd", "MExplode", "MRefuse", "MSlow", "MStuck"]
    assert current.events == ["MNoticed"]
    assert current.version == fastapi_catga.__version__
    assert current.last_seen.tzinfo is not None
    assert current.last_seen.utcoffset() == UTC.utcoffset(None)
    assert current.started_at <= current.last_seen


async def test_broker_outage_on_one_node(catga: Catga, broker: InMemoryBroker) -> None:
    broker.outage()
    assert await catga.mediator.send(MAdd(a=1, b=2)) == 3
    assert await catga.mediator.send(MAdd(a=1, b=2), timeout=5) == 3
    # The view is stale: other nodes may be out there, so the event must travel and cannot.
    with pytest.raises(TransportError):
        await catga.mediator.publish(MNoticed(what="offline"))
    assert noticed == ["first:offline", "last:offline"]  # the local handlers still ran
    broker.restore()
    await eventually(lambda: not catga.node.view.stale, within=5, message="resynced after the outage")
    await catga.mediator.publish(MNoticed(what="online"))
    assert noticed[-2:] == ["first:online", "last:online"]
