"""Handler limits on a virtual clock: "busy" at once, failover at once, the same limit on the
in-process path, events queued and dropped within bounds, a slot given back whatever raises, a
"busy" answer that holds no request, a stop that cannot hang. `HandlerLimits` alone: test_limits."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
import sys
import weakref
from collections import Counter
from typing import Any, ClassVar

import pytest

from fastapi_catga import (
    BusyError,
    Catga,
    CatgaError,
    CatgaSettings,
    Command,
    Event,
    build,
    handler,
)
from fastapi_catga.cluster.limits import HandlerLimits
from fastapi_catga.cluster.runs import MAX_BUSY_REPLIES, Runs
from fastapi_catga.core.envelope import Envelope, encode_message, error_from_reply
from fastapi_catga.core.logs import LogLimiter
from fastapi_catga.core.messages import Message
from fastapi_catga.core.observe import Observer
from fastapi_catga.testing import InMemoryBroker, InMemoryTransport
from fastapi_catga.transports.base import Delivery
from tests.cluster.conftest import NodeTag
from tests.cluster.workload import current_node
from tests.virtual_time import EPOCH, run_virtual

runs: Counter[str] = Counter()
ticks: list[str] = []


class Hold(Command[str]):
    seconds: float = 10.0


class Capped(Command[str]):
    max_in_flight: ClassVar[int | None] = 1


class SelfBusy(Command[str]):
    pass


class Stubborn(Command[None]):
    pass


class Tick(Event):
    seconds: float = 1.0


@handler
async def hold(command: Hold) -> str:
    await asyncio.sleep(command.seconds)
    return current_node.get()


@handler
async def capped(command: Capped) -> str:
    await asyncio.sleep(5)
    return current_node.get()


@handler
async def self_busy(command: SelfBusy) -> str:
    runs[command.message_id] += 1
    raise BusyError("the warehouse service is full")


@handler
async def stubborn(command: Stubborn) -> None:
    with contextlib.suppress(asyncio.CancelledError):  # swallowed: what a bounded stop must survive
        await asyncio.sleep(3600)
    await asyncio.sleep(3600)


@handler
async def tick(event: Tick) -> None:
    ticks.append(current_node.get())
    await asyncio.sleep(event.seconds)


class Seen(Observer):
    def __init__(self) -> None:
        self.overloads: list[tuple[str, str]] = []
        self.failovers: list[tuple[str, str]] = []

    def overloaded(self, type_name: str, outcome: str) -> None:
        self.overloads.append((type_name, outcome))

    def failover(self, message: Message, node_id: str, error: CatgaError) -> None:
        self.failovers.append((node_id, error.code))


def node(broker: InMemoryBroker, name: str, *, handlers: bool = True, observer: Observer | None = None,
         **settings: Any) -> Catga:  # fmt: skip
    loop = asyncio.get_running_loop()
    config = CatgaSettings(
        node_id=name, heartbeat_interval=1.0, node_ttl=3.0, request_timeout=30.0, **settings
    )
    return build(
        config,
        handlers=[sys.modules[__name__]] if handlers else [],
        behaviors=[NodeTag(name)],
        transport=InMemoryTransport(broker),
        observers=[observer] if observer else [],
        clock=loop.time,
        wall_clock=lambda: EPOCH + loop.time(),
    )


async def started(*nodes: Catga) -> list[Catga]:
    for each in nodes:
        await each.start()
    await until(lambda: all(len(n.node.nodes()) == len(nodes) for n in nodes))
    return list(nodes)


async def until(condition: Any, within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    ends = loop.time() + within
    while not condition():
        assert loop.time() < ends, "condition not met in virtual time"
        await asyncio.sleep(0.001)


@pytest.fixture(autouse=True)
def fresh() -> None:
    runs.clear()
    ticks.clear()


def test_a_node_without_a_free_slot_answers_busy_at_once() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        seen = Seen()
        a, caller = await started(
            node(broker, "a", max_in_flight=2, observer=seen), node(broker, "caller", handlers=False)
        )
        holding = [asyncio.create_task(caller.mediator.send_to_node(Hold(), "a")) for _ in range(2)]
        await until(lambda: a.node.limits.in_flight == 2)
        asked = loop.time()
        with pytest.raises(BusyError, match="node a is busy") as info:
            await caller.mediator.send_to_node(Hold(), "a")
        assert loop.time() == asked, "answered at once, not after a timeout"
        assert info.value.node_id == "a"
        health = a.node.health()["stats"]
        assert health["busy"] == 1 and health["in_flight"] == 2
        assert seen.overloads == [("Hold", "busy")]
        assert await asyncio.gather(*holding) == ["a", "a"]  # what was accepted ran to its end
        assert await caller.mediator.send_to_node(Hold(seconds=0), "a") == "a"  # room again
        for each in (a, caller):
            await each.stop()

    run_virtual(scenario())


def test_a_busy_node_sends_the_call_on_to_another_at_once() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        seen = Seen()
        a, b, caller = await started(
            node(broker, "a", max_in_flight=1),
            node(broker, "b"),
            node(broker, "caller", handlers=False, observer=seen),
        )
        filler = asyncio.create_task(caller.mediator.send_to_node(Hold(seconds=100), "a"))
        await until(lambda: a.node.limits.in_flight == 1)
        asked = loop.time()
        served = await asyncio.gather(*(caller.mediator.send(Hold(seconds=1)) for _ in range(6)))
        assert served == ["b"] * 6
        assert loop.time() - asked == pytest.approx(1.0, abs=0.01), "no backoff after a busy answer"
        assert seen.failovers and set(seen.failovers) == {("a", "busy")}
        assert not caller.node.view.is_suspect("a"), "a busy node is alive: not suspect"
        filler.cancel()
        for each in (a, b, caller):
            await each.stop()

    run_virtual(scenario())


def test_when_every_node_is_busy_the_send_fails_busy_at_once() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        a, b, caller = await started(
            node(broker, "a", max_in_flight=1),
            node(broker, "b", max_in_flight=1),
            node(broker, "caller", handlers=False),
        )
        fillers = [asyncio.create_task(caller.mediator.send_to_node(Hold(), name)) for name in "ab"]
        await until(lambda: a.node.limits.in_flight == b.node.limits.in_flight == 1)
        asked = loop.time()
        with pytest.raises(BusyError, match="every node tried is busy"):
            await caller.mediator.send(Hold())
        assert loop.time() == asked
        await asyncio.gather(*fillers)
        for each in (a, b, caller):
            await each.stop()

    run_virtual(scenario())


def test_a_handlers_own_busy_error_is_its_answer_returned_once() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        seen = Seen()
        a, b, caller = await started(
            node(broker, "a"), node(broker, "b"), node(broker, "caller", handlers=False, observer=seen)
        )
        for _ in range(4):
            command = SelfBusy()
            with pytest.raises(BusyError, match="the warehouse service is full"):
                await caller.mediator.send(command)
            assert runs[command.message_id] == 1
        assert seen.failovers == [] and a.node.limits.stats["busy"] == b.node.limits.stats["busy"] == 0
        for each in (a, b, caller):
            await each.stop()

    run_virtual(scenario())


def test_the_in_process_path_meets_the_same_limits() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        (solo,) = await started(node(broker, "solo", max_in_flight=2))
        assert Hold in solo.node.local_routes  # only this node handles it: the fast path
        first = asyncio.create_task(solo.mediator.send(Capped()))
        await until(lambda: solo.node.limits.in_flight == 1)
        with pytest.raises(BusyError, match="Capped is at its limit"):  # the class's own cap: 1
            await solo.mediator.send(Capped())
        second = asyncio.create_task(solo.mediator.send(Hold()))
        await until(lambda: solo.node.limits.in_flight == 2)
        with pytest.raises(BusyError, match="node solo is busy"):  # the node's 2
            await solo.mediator.send(Hold())
        assert list(await asyncio.gather(first, second)) == ["solo", "solo"]
        assert solo.node.limits.in_flight == 0
        await solo.stop()

    run_virtual(scenario())


def test_events_beyond_the_limit_wait_and_the_overflow_is_dropped_and_counted() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        seen = Seen()
        a, caller = await started(
            node(broker, "a", max_in_flight=1, max_queued_events=2, observer=seen),
            node(broker, "caller", handlers=False),
        )
        for _ in range(5):
            await caller.mediator.publish(Tick(seconds=1))
        await until(lambda: a.node.limits.stats["events_dropped"] == 2)
        assert a.node.health()["stats"]["events_waiting"] == 2
        await until(lambda: len(ticks) == 3 and a.node.limits.in_flight == 0)
        assert seen.overloads == [("Tick", "dropped")] * 2
        for each in (a, caller):
            await each.stop()

    run_virtual(scenario())


def test_stop_is_bounded_even_when_a_handler_swallows_its_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        a, caller = await started(
            node(broker, "a", drain_timeout=2.0), node(broker, "caller", handlers=False)
        )
        call = asyncio.create_task(caller.mediator.send_to_node(Stubborn(), "a", timeout=3600))
        await until(lambda: a.node.limits.in_flight == 1)
        stopping = loop.time()
        await a.stop()
        assert loop.time() - stopping <= 2.0 + 1.0 + 0.1
        abandoned = [r.getMessage() for r in caplog.records if "abandoned" in r.getMessage()]
        assert len(abandoned) == 1 and "abandoned 1 handler run(s)" in abandoned[0]
        assert "Stubborn" in abandoned[0]
        call.cancel()
        await caller.stop()

    caplog.set_level(logging.WARNING)
    run_virtual(scenario())


class BrokenObserver(Observer):
    def handle_started(self, message: Message, headers: Any) -> object:
        raise RuntimeError("the observer broke")


def test_an_observer_that_raises_as_a_run_starts_here_gives_its_slot_back() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        a, b = await started(
            node(broker, "a", max_in_flight=1, routing="local_first", observer=BrokenObserver()),
            node(broker, "b"),
        )
        assert Hold not in a.node.local_routes  # b handles it too: an attempt routed to a, run here
        for _ in range(3):
            with pytest.raises(RuntimeError, match="the observer broke"):
                await a.mediator.send(Hold(seconds=0))
            assert a.node.limits.in_flight == 0, "the slot leaked: the node would stay busy for good"
        for each in (a, b):
            await each.stop()

    run_virtual(scenario())


class Tracked(Envelope):
    """An envelope a weak reference can follow (`Envelope` has slots; a plain subclass does not)."""


def test_a_busy_answer_waiting_for_the_broker_holds_no_request_and_their_number_is_bounded() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        (a,) = await started(node(broker, "a", max_in_flight=1))
        assert a.node.limits.enter("Hold")  # the node is full
        taking = asyncio.Event()
        answers: list[Envelope] = []

        async def reply(answer: Envelope) -> None:  # a broker that takes no reply until told
            await taking.wait()
            answers.append(answer)

        sent = encode_message(Hold(), source="caller", max_payload=2**20)
        request = Tracked(sent.headers, b"x" * 2**20)  # as large as a request may be
        held = weakref.ref(request)
        a.node.responder._on_request(Delivery(request, reply))
        del request
        gc.collect()
        assert a.node.limits.stats["busy"] == 1
        assert held() is None, "a pending busy answer keeps the whole request in memory"
        for _ in range(MAX_BUSY_REPLIES):  # 999 more wait, then one is left unanswered
            a.node.responder._on_request(Delivery(Envelope(sent.headers, b"x"), reply))
        assert a.node.health()["stats"]["busy_unanswered"] == 1
        taking.set()
        await until(lambda: len(answers) == MAX_BUSY_REPLIES)
        assert isinstance(error_from_reply(answers[0]), BusyError)
        a.node.responder._on_request(Delivery(Envelope(sent.headers, b"x"), reply))  # room again
        await until(lambda: len(answers) == MAX_BUSY_REPLIES + 1)
        a.node.limits.leave("Hold")
        await a.stop()

    run_virtual(scenario())


def test_a_run_whose_task_cannot_start_gives_its_slot_back() -> None:
    limits = HandlerLimits(1, 0, 10, [], node_id="n")
    runs = Runs(limits, "n", LogLimiter())

    async def work() -> None:
        pass

    assert limits.enter("Hold")
    run = work()
    with pytest.raises(RuntimeError, match="no running event loop"):
        runs.spawn(run, "Hold 1 from caller", "Hold")
    assert limits.in_flight == 0 and inspect.getcoroutinestate(run) == "CORO_CLOSED"  # never "never awaited"
