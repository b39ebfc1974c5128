"""Durable delivery on the in-memory broker, on a virtual clock: the processing rules, in milliseconds.

The same rules over JetStream and Redis Streams, with real processes killed and paused, are in
tests/multiprocess/test_durable.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections import Counter
from collections.abc import Awaitable
from typing import Any, ClassVar

import pytest

from fastapi_catga import (
    Catga,
    CatgaSettings,
    Command,
    ConfigurationError,
    Durable,
    Event,
    MessageTooLargeError,
    MessageValidationError,
    Reject,
    RemoteHandlerError,
    RequestTimeoutError,
    RetryLater,
    TransportError,
    build,
    handler,
)
from fastapi_catga.core.observe import Observer
from fastapi_catga.core.tasks import CANCEL_GRACE
from fastapi_catga.testing import InMemoryBroker, InMemoryTransport
from fastapi_catga.transports.memory_durable import MemoryDurableStore
from tests.virtual_time import EPOCH, run_virtual, virtual_node

runs: Counter[str] = Counter()  # message id -> handler runs (any node)
starts: dict[str, list[float]] = {}  # message id -> loop times of each run
effects: Counter[str] = Counter()  # message id -> runs that succeeded
broken: set[str] = set()  # ids whose handler raises until removed


class Charge(Command[str]):
    durable: ClassVar[Durable | bool] = Durable(attempts=3, backoff=(1.0, 4.0), lease=2.0, dedup_window=60)
    amount: int
    work: float = 0.0
    mode: str = "ok"


#: What a handler may raise that ends no process here: its own errors, retried and dead-lettered.
EXITS: dict[str, type[BaseException]] = {"exit": SystemExit, "generator-exit": GeneratorExit}


class Shipped(Event):
    durable: ClassVar[Durable | bool] = True
    order: str


seen: list[tuple[str, str, str]] = []  # (handler, node, event id)


@handler
async def charge(command: Charge) -> str:
    loop = asyncio.get_running_loop()
    runs[command.message_id] += 1
    starts.setdefault(command.message_id, []).append(loop.time())
    if command.work:
        await asyncio.sleep(command.work)
    if command.mode == "reject":
        raise Reject("amount is not allowed")
    if command.mode == "later" and runs[command.message_id] == 1:
        raise RetryLater("the bank is busy", delay=7.0)
    if command.message_id in broken:
        raise ValueError("card declined")
    if command.mode in EXITS:
        raise EXITS[command.mode]()
    effects[command.message_id] += 1
    if command.mode == "huge":  # a reply over the payload limit
        return "x" * 2 * 1024 * 1024
    return f"charged {command.amount}"


@handler
async def email_on_shipped(event: Shipped) -> None:
    seen.append(("email", NODE.get(), event.message_id))


@handler
async def stock_on_shipped(event: Shipped) -> None:
    seen.append(("stock", NODE.get(), event.message_id))


import contextvars  # noqa: E402 - after the handlers, as their helper

NODE: contextvars.ContextVar[str] = contextvars.ContextVar("node", default="?")


class Tag:
    def __init__(self, node_id: str) -> None:
        self.node_id = node_id

    async def __call__(self, message: Any, call_next: Any) -> Any:
        token = NODE.set(self.node_id)
        try:
            return await call_next()
        finally:
            NODE.reset(token)


@pytest.fixture(autouse=True)
def fresh() -> None:
    for ledger in (runs, starts, effects, broken):
        ledger.clear()
    seen.clear()


def node(broker: InMemoryBroker, node_id: str, handlers: list[Any] | None = None, **settings: Any) -> Catga:
    return virtual_node(
        broker,
        node_id,
        handlers=[sys.modules[__name__]] if handlers is None else handlers,
        behaviors=[Tag(node_id)],
        **{"heartbeat_interval": 1, "node_ttl": 3, "request_timeout": 30, **settings},
    )


async def cluster(*names: str) -> tuple[InMemoryBroker, list[Catga]]:
    broker = InMemoryBroker(clock=asyncio.get_running_loop().time)
    nodes = [node(broker, name) for name in names]
    for catga in nodes:
        await catga.start()
    return broker, nodes


def test_a_durable_send_runs_once_and_a_resend_gets_the_stored_result() -> None:
    async def scenario() -> None:
        _, (a, b) = await cluster("a", "b")
        command = Charge(amount=5)
        assert await a.mediator.send(command) == "charged 5"
        assert await b.mediator.send(command) == "charged 5", "the same id again: the stored result"
        assert runs[command.message_id] == 1
        accepted = await a.mediator.enqueue(Charge(amount=7))
        await asyncio.sleep(1)
        assert effects[accepted.message_id] == 1
        for catga in (a, b):
            await catga.stop()

    run_virtual(scenario())


def test_a_durable_type_no_handler_could_register_is_refused_at_send_and_enqueue() -> None:
    """Its name would make no stream subject or key: refused at once, as a plain send refuses it."""

    class Spaced(Command[str]):
        type_name: ClassVar[str] = "has space"
        durable: ClassVar[Durable | bool] = True

    async def scenario() -> None:
        _, (a,) = await cluster("a")
        with pytest.raises(ConfigurationError, match="'has space'"):
            await a.mediator.send(Spaced())
        with pytest.raises(ConfigurationError, match="'has space'"):
            await a.mediator.enqueue(Spaced())
        await a.stop()

    run_virtual(scenario())


def test_a_send_that_times_out_says_the_command_was_accepted_and_still_runs() -> None:
    async def scenario() -> None:
        _, (a,) = await cluster("a")
        command = Charge(amount=1, work=5.0)
        with pytest.raises(RequestTimeoutError) as info:
            await a.mediator.send(command, timeout=1.0)
        assert info.value.details == {"accepted": True, "message_id": command.message_id}
        await asyncio.sleep(6)
        assert effects[command.message_id] == 1, "it ran to the end after the caller gave up"
        assert await a.mediator.send(command) == "charged 1"
        assert runs[command.message_id] == 1
        await a.stop()

    run_virtual(scenario())


def test_a_poison_message_is_dead_lettered_after_exactly_its_attempts_with_the_backoff_then_replayed() -> (
    None
):
    async def scenario() -> None:
        _, (a, b) = await cluster("a", "b")
        command = Charge(amount=9)
        broken.add(command.message_id)
        with pytest.raises(RemoteHandlerError, match="ValueError"):
            await a.mediator.send(command)
        assert runs[command.message_id] == 3
        first, second, third = starts[command.message_id]
        assert 0.8 <= second - first <= 1.1 and 3.2 <= third - second <= 4.1, starts[command.message_id]
        (letter,) = await b.mediator.dead_letters.list()
        assert (letter.id, letter.reason, letter.error_type, letter.attempts) == (
            f"workers:{command.message_id}", "attempts", "ValueError", 3,
        )  # fmt: skip
        assert letter.message_type == "Charge" and letter.node_id in {"a", "b"}
        await asyncio.sleep(30)
        assert runs[command.message_id] == 3, "nothing runs while it is dead-lettered"
        broken.clear()  # the handler is fixed
        assert await a.mediator.dead_letters.replay(letter.id)
        await asyncio.sleep(1)
        assert effects[command.message_id] == 1
        assert await a.mediator.dead_letters.list() == []
        assert not await a.mediator.dead_letters.replay(letter.id)
        for catga in (a, b):
            await catga.stop()

    run_virtual(scenario())


@pytest.mark.parametrize("mode", sorted(EXITS))
def test_a_handler_raising_an_exit_is_retried_and_dead_lettered_like_any_error(mode: str) -> None:
    async def scenario() -> None:
        _, (a, b) = await cluster("a", "b")
        command = Charge(amount=9, mode=mode)
        with pytest.raises(RemoteHandlerError, match=EXITS[mode].__name__):
            await a.mediator.send(command)
        assert runs[command.message_id] == 3, "each delivery answered, none left to its lease"
        (letter,) = await b.mediator.dead_letters.list()
        assert (letter.reason, letter.error_type) == ("attempts", EXITS[mode].__name__)
        for catga in (a, b):
            await catga.stop()

    run_virtual(scenario())


class Quick(Command[str]):
    durable: ClassVar[Durable | bool] = Durable(lease=1.0)


@handler
async def quick(command: Quick) -> str:
    return "quick"


def test_each_durable_queue_is_prepared_with_its_own_types_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    """A JetStream consumer's ack wait is the lease: a type's own, not the longest of the node's."""
    prepared: dict[str, float] = {}

    async def scenario() -> None:
        _, (a,) = await cluster("a")
        store = a.node.transport.durable
        real = store.prepare

        async def recorded(queues: Any, *, lease: float, **settings: Any) -> None:
            prepared.update((queue.type_name, lease) for queue in queues)
            await real(queues, lease=lease, **settings)

        monkeypatch.setattr(store, "prepare", recorded)
        await a.node.durable_runner.prepare()
        await a.stop()

    run_virtual(scenario())
    assert (prepared["Quick"], prepared["Charge"]) == (1.0, 2.0), prepared


def test_copies_of_one_message_sent_at_once_run_it_once() -> None:
    """The second copy waits on the first's lease; once it is let go, the done record the first
    wrote before letting go answers the copy: it never runs the handler again."""

    async def scenario() -> None:
        _, (a, b) = await cluster("a", "b")
        command = Charge(amount=4, work=1.0)
        sends = [a.mediator.send(command), b.mediator.send(command), a.mediator.send(command)]
        assert await asyncio.gather(*sends) == ["charged 4"] * 3
        assert runs[command.message_id] == 1
        for catga in (a, b):
            await catga.stop()

    run_virtual(scenario())


def test_a_dead_letter_replayed_again_and_again_runs_each_time_and_counts_its_replays() -> None:
    """Each replay is stored under a dedup id of its own: the broker's duplicate window (2 min on
    JetStream) must not swallow the second replay of a message that failed again."""

    async def scenario() -> None:
        _, (a,) = await cluster("a")
        command = Charge(amount=5)
        broken.add(command.message_id)
        await a.mediator.enqueue(command)
        for replays in range(3):
            while not (letters := await a.mediator.dead_letters.list()):
                await asyncio.sleep(1)
            (letter,) = letters
            assert (letter.replays, runs[command.message_id]) == (replays, 3 * (replays + 1))
            if replays == 2:
                broken.clear()  # the handler is fixed
            assert await a.mediator.dead_letters.replay(letter.id)
        while not effects[command.message_id]:
            await asyncio.sleep(1)
        assert runs[command.message_id] == 10 and await a.mediator.dead_letters.list() == []
        await a.stop()

    run_virtual(scenario())


def test_reject_dead_letters_at_once_and_retry_later_waits_its_delay() -> None:
    async def scenario() -> None:
        _, (a,) = await cluster("a")
        rejected = Charge(amount=1, mode="reject")
        with pytest.raises(Reject):
            await a.mediator.send(rejected)
        assert runs[rejected.message_id] == 1
        (letter,) = await a.mediator.dead_letters.list()
        assert letter.reason == "rejected"
        assert await a.mediator.dead_letters.discard(letter.id)
        later = Charge(amount=2, mode="later")
        assert await a.mediator.send(later) == "charged 2"
        first, second = starts[later.message_id]
        assert 7.0 <= second - first <= 7.2
        await a.stop()

    run_virtual(scenario())


def test_a_replay_that_fails_again_at_once_leaves_its_new_dead_letter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The replay queues the message, then drops the old letter: a node that fails it in between
    (rejected at once, unreadable by this version) found the old letter kept, dropped the message
    as "dead-lettered already", and the replay then dropped the letter: the message was gone.
    A broker slow to drop it (a second here) makes the in-between certain: the node holds the
    message, not running it again, until the replay lets go of its claim."""
    remove = MemoryDurableStore.remove_dead_letter

    async def slow_remove(self: MemoryDurableStore, letter_id: str) -> bool:
        await asyncio.sleep(1)
        return await remove(self, letter_id)

    monkeypatch.setattr(MemoryDurableStore, "remove_dead_letter", slow_remove)

    async def scenario() -> None:
        _, (a, b) = await cluster("a", "b")
        rejected = Charge(amount=1, mode="reject")
        with pytest.raises(Reject):
            await a.mediator.send(rejected)
        (letter,) = await a.mediator.dead_letters.list()
        for replays in (1, 2):
            assert await a.mediator.dead_letters.replay(letter.id)
            await asyncio.sleep(5)  # virtual seconds past the replay's end
            assert runs[rejected.message_id] == 1 + replays, "once a replay: held, not run again"
            (again,) = await a.mediator.dead_letters.list()
            assert (again.id, again.replays, again.reason) == (letter.id, replays, "rejected")
            assert again.error_type == "Reject", "the handler's own error, not 'delivered N times'"
        for catga in (a, b):
            await catga.stop()

    run_virtual(scenario())


def test_a_message_rejected_again_after_its_dedup_window_keeps_one_letter_and_counts_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Letters(Observer):
        def __init__(self) -> None:
            self.seen: list[str] = []

        def dead_lettered(self, type_name: str, reason: str) -> None:
            self.seen.append(reason)

    async def scenario() -> None:
        letters = Letters()
        a = node(InMemoryBroker(clock=asyncio.get_running_loop().time), "a", observers=[letters])
        await a.start()
        rejected = Charge(amount=1, mode="reject")
        for _ in range(2):
            with pytest.raises(Reject):
                await a.mediator.send(rejected)
            await asyncio.sleep(200)  # past the dedup window: the same id is enqueued again
        assert runs[rejected.message_id] == 2
        assert len(await a.mediator.dead_letters.list()) == 1
        assert letters.seen == ["rejected"], "the metric counts the letters stored"
        await a.stop()

    run_virtual(scenario())
    assert "not dead-lettered again" in caplog.text


def test_a_node_that_dies_mid_handler_is_taken_over_after_the_lease_and_nothing_succeeds_twice() -> None:
    async def scenario() -> None:
        broker, (a, b) = await cluster("a", "b")
        loop = asyncio.get_running_loop()
        ids = []
        for n in range(20):
            accepted = await a.mediator.enqueue(Charge(amount=n, work=1.0))
            ids.append(accepted.message_id)
        await asyncio.sleep(0.5)
        died = loop.time()
        b.node.transport.crash()  # type: ignore[attr-defined]
        c = node(broker, "c")
        await c.start()
        store = a.node.transport.durable

        async def committed() -> int:
            return sum([await store.done(f"workers:{i}") is not None for i in ids])

        while await committed() < 20:
            assert loop.time() - died < 20, f"{await committed()} of 20 committed"
            await asyncio.sleep(0.5)
        assert await a.mediator.dead_letters.list() == []
        # (The crashed node's handlers in this process run on, unlike a kill -9's; its commits fail,
        # so each command has exactly one committed result. The multi-process test counts effects.)
        for catga in (a, c):
            await catga.stop()

    run_virtual(scenario())


def test_a_durable_event_runs_once_per_handler_group_including_a_node_that_was_down() -> None:
    async def scenario() -> None:
        broker = InMemoryBroker(clock=asyncio.get_running_loop().time)
        this = sys.modules[__name__]
        a = node(broker, "a", handlers=[email_on_shipped, charge])
        b = node(broker, "b", handlers=[email_on_shipped, stock_on_shipped, charge])
        for catga in (a, b):
            await catga.start()
        await b.stop()  # the only node with the stock handler is down when the event is published
        event = Shipped(order="o-1")
        await a.mediator.publish(event)
        await asyncio.sleep(2)
        assert [(h, n) for h, n, _ in seen] == [("email", "a")], "never inline, once per group"
        back = node(broker, "b2", handlers=[this])
        await back.start()
        await asyncio.sleep(2)
        assert sorted(h for h, _, _ in seen) == ["email", "stock"]
        for catga in (a, back):
            await catga.stop()

    run_virtual(scenario())


def test_the_dedup_window_ends() -> None:
    class Short(Command[str]):
        durable: ClassVar[Durable | bool] = Durable(dedup_window=5)

    async def run_short(command: Short) -> str:
        runs[command.message_id] += 1
        return "ok"

    run_short.__annotations__["command"] = Short

    async def scenario() -> None:
        broker = InMemoryBroker(clock=asyncio.get_running_loop().time)
        a = node(broker, "a", handlers=[handler(run_short)])
        await a.start()
        command = Short()
        assert await a.mediator.send(command) == "ok"
        await asyncio.sleep(2)
        assert await a.mediator.send(command) == "ok"
        assert runs[command.message_id] == 1, "within the window: the stored result"
        await asyncio.sleep(200)  # past the window (and the broker's duplicate window)
        assert await a.mediator.send(command) == "ok"
        assert runs[command.message_id] == 2, "after the window: run again"
        await a.stop()

    run_virtual(scenario())


def test_enqueue_send_to_node_and_broadcast_refuse_what_they_cannot_do() -> None:
    async def scenario() -> None:
        _, (a,) = await cluster("a")
        with pytest.raises(MessageValidationError, match="durable Command"):
            await a.mediator.enqueue(Shipped(order="x"))  # type: ignore[arg-type]
        with pytest.raises(MessageValidationError, match="send_to_node cannot pick one"):
            await a.mediator.send_to_node(Charge(amount=1), "a")
        with pytest.raises(MessageValidationError, match="broadcast cannot run it on every node"):
            await a.mediator.broadcast(Charge(amount=1))  # it would charge once per node
        await a.stop()

    run_virtual(scenario())


def test_the_idempotency_behavior_runs_a_handler_once_per_id_across_nodes() -> None:
    from fastapi_catga import IdempotencyBehavior, Query

    class Quote(Query[int]):
        pass

    async def quote(query: Quote) -> int:
        runs[query.message_id] += 1
        await asyncio.sleep(0.5)
        return 42

    quote.__annotations__["query"] = Quote
    handler(quote)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        nodes = [
            build(
                CatgaSettings(node_id=name, heartbeat_interval=1, node_ttl=3),
                handlers=[quote],
                behaviors=[IdempotencyBehavior(window=60)],
                transport=InMemoryTransport(broker),
                clock=loop.time,
                wall_clock=lambda: EPOCH + loop.time(),
            )
            for name in ("a", "b")
        ]
        for catga in nodes:
            await catga.start()
        query = Quote()
        answers = await asyncio.gather(*(n.mediator.send_to_node(query, n.node.node_id) for n in nodes))
        assert answers == [42, 42]
        assert runs[query.message_id] == 1, "the second node answered from the first one's record"
        for catga in nodes:
            await catga.stop()

    run_virtual(scenario())


def test_an_undecodable_durable_message_is_dead_lettered_as_invalid_without_running() -> None:
    from fastapi_catga.core.envelope import MESSAGE_ID, MESSAGE_TYPE, Envelope

    async def scenario() -> None:
        _, (a,) = await cluster("a")
        store = a.node.transport.durable
        await store.append(
            "cmd",
            "Charge",
            Envelope({MESSAGE_TYPE: "Charge", MESSAGE_ID: "bad-1"}, b"{not json"),
            dedup_id="bad-1",
        )
        await store.append(
            "cmd",
            "Charge",
            Envelope({MESSAGE_TYPE: "Shipped", MESSAGE_ID: "bad-2"}, b'{"order": "x"}'),
            dedup_id="bad-2",
        )
        for n in range(2):  # no id at all: each is a letter of its own, not the first one alone
            await store.append("cmd", "Charge", Envelope({}, b"garbage"), dedup_id=f"nameless-{n}")
        await asyncio.sleep(2)
        letters = {letter.message_id: letter for letter in await a.mediator.dead_letters.list()}
        assert {letters["bad-1"].reason, letters["bad-2"].reason} == {"invalid"}
        nameless = [letter for message_id, letter in letters.items() if message_id.startswith("unknown-")]
        assert len(nameless) == 2 and {letter.reason for letter in nameless} == {"invalid"}
        assert letters["bad-1"].error_type == "MessageValidationError"
        assert runs == Counter()
        await a.stop()

    run_virtual(scenario())


def test_a_message_whose_lease_another_node_holds_waits_and_one_run_commits() -> None:
    async def scenario() -> None:
        _, (a,) = await cluster("a")
        store = a.node.transport.durable
        command = Charge(amount=3)
        assert await store.claim(f"workers:{command.message_id}", "someone-else", 5.0)
        accepted = await a.mediator.enqueue(command)
        await asyncio.sleep(1)
        assert runs[accepted.message_id] == 0, "not while another node holds it"
        await asyncio.sleep(10)  # the other's lease ran out, and the delivery came back
        assert effects[accepted.message_id] == 1
        await a.stop()

    run_virtual(scenario())


def test_durable_options_are_checked() -> None:
    nan, inf = float("nan"), float("inf")
    for bad in (
        {"attempts": 0}, {"backoff": ()}, {"backoff": (-1.0,)}, {"backoff": (1.0, nan)}, {"lease": 0},
        {"lease": inf}, {"lease": 1e12}, {"dedup_window": -5}, {"dedup_window": nan}, {"backoff": (1e10,)},
    ):  # fmt: skip
        with pytest.raises(ValueError, match="Durable"):
            Durable(**bad)
    with pytest.raises(ValueError, match="delays"):
        CatgaSettings(durable_backoff="1,-2")


def test_two_copies_of_one_id_on_one_node_never_run_at_once_and_both_sends_get_the_result() -> None:
    async def scenario() -> None:
        _, (a,) = await cluster("a")
        command = Charge(amount=4, work=3.0)
        first = asyncio.create_task(a.mediator.send(command, timeout=1.0))
        await asyncio.sleep(0.5)
        second = asyncio.create_task(a.mediator.send(command, timeout=10.0))  # a re-send while it runs
        third = asyncio.create_task(a.mediator.send(command, timeout=10.0))
        with pytest.raises(RequestTimeoutError):
            await first
        assert await second == await third == "charged 4"
        assert runs[command.message_id] == 1, "the second copy waited for the first run"
        await a.stop()

    run_virtual(scenario())


def test_a_stop_leaves_behind_a_fetch_and_a_run_that_ignore_their_cancellation(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A broker call that hangs through its cancellation (the consumer's close here) or a handler that
    swallows it must not hold up a stop: both are named in the log and left behind."""
    released = asyncio.Event()

    async def deaf() -> None:
        while not released.is_set():
            with contextlib.suppress(asyncio.CancelledError):  # deaf to it: the point of the test
                await released.wait()

    async def hanging_close(self: object) -> None:
        await deaf()

    class Stubborn(Command[str]):
        durable: ClassVar[Durable | bool] = Durable(lease=30)

    async def run_stubborn(command: Stubborn) -> str:
        await deaf()
        return "done"

    run_stubborn.__annotations__["command"] = Stubborn
    monkeypatch.setattr("fastapi_catga.transports.memory_durable._Consumer.close", hanging_close)

    async def scenario() -> None:
        broker = InMemoryBroker(clock=asyncio.get_running_loop().time)
        a = node(broker, "a", handlers=[handler(run_stubborn)], drain_timeout=3)
        await a.start()
        await a.mediator.enqueue(Stubborn())
        await asyncio.sleep(1)  # the run started and will not end
        loop = asyncio.get_running_loop()
        began = loop.time()
        await a.stop()
        assert loop.time() - began <= 3 + 2 * CANCEL_GRACE + 1, (
            "the drain, then a grace for each kind of task"
        )
        released.set()

    with caplog.at_level("ERROR"):
        run_virtual(scenario())
    said = caplog.text
    assert "durable fetch task(s) did not end" in said and "catga-durable-Stubborn" in said
    assert "durable run task(s) did not end" in said and "catga-durable-run-Stubborn" in said


def test_a_fetch_that_turns_the_stops_cancellation_into_an_error_still_ends(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that catches the cancellation and raises its own connection error: the worker
    would back off and fetch again, for ever; a stopping runner ends it instead."""
    fetches = 0

    async def swallowing_fetch(self: object, limit: int, wait: float) -> list[Any]:
        nonlocal fetches
        fetches += 1
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise TransportError("the connection broke while reading") from None
        return []

    monkeypatch.setattr("fastapi_catga.transports.memory_durable._Consumer.fetch", swallowing_fetch)

    async def scenario() -> None:
        broker = InMemoryBroker(clock=asyncio.get_running_loop().time)
        a = node(broker, "a")
        await a.start()
        await asyncio.sleep(1)
        await a.stop()
        workers = a.node.durable_runner._tasks
        assert workers and all(task.done() for task in workers), "no worker is left fetching"
        assert fetches == len(workers)
        await asyncio.sleep(60)
        assert fetches == len(workers), "nothing fetched after the stop"

    with caplog.at_level("WARNING"):
        run_virtual(scenario())
    assert "did not end" not in caplog.text and "fetching failed" not in caplog.text


def test_a_durable_result_over_the_payload_limit_is_refused_as_a_plain_sends_is_and_run_once() -> None:
    """The same call, durable or not, ends the same way: `MessageTooLargeError` for its caller.
    Running it again would give the same result: it is dead-lettered at once, no done record kept."""

    async def scenario() -> None:
        _, (a, b) = await cluster("a", "b")
        command = Charge(amount=1, mode="huge")
        with pytest.raises(MessageTooLargeError, match="the result"):
            await a.mediator.send(command, timeout=10)
        assert runs[command.message_id] == 1
        (letter,) = await a.mediator.dead_letters.list()
        assert (letter.message_id, letter.reason, letter.error_type) == (
            command.message_id,
            "invalid",
            "MessageTooLargeError",
        )
        assert await a.node.transport.durable.done(f"workers:{command.message_id}") is None
        for catga in (a, b):
            await catga.stop()

    run_virtual(scenario())


def test_an_enqueue_or_durable_publish_to_a_frozen_broker_ends_by_the_request_timeout() -> None:
    """The broker takes it or not within ``CATGA_REQUEST_TIMEOUT``: `TransportError`, "accepted"
    unknown (enqueueing it again with its id stores it once). It queued up behind each other's
    stream-making for several times the store's own timeout."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        gateway = node(broker, "gateway", handlers=[], request_timeout=5)  # makes its streams on first use
        await gateway.start()
        broker.freeze()
        started = loop.time()
        calls: list[Awaitable[object]] = [gateway.mediator.enqueue(Charge(amount=n)) for n in range(3)]
        calls.append(gateway.mediator.publish(Shipped(order="o-1")))
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert loop.time() - started <= 5.01
        for outcome in outcomes:
            assert isinstance(outcome, TransportError), outcome
            assert "did not confirm it within 5 s" in str(outcome)
            assert outcome.details is not None and outcome.details["accepted"] is None
        started = loop.time()  # the dead letters wait for the streams too, as long at most
        with pytest.raises(TransportError, match="did not make the durable streams within 5 s"):
            await gateway.mediator.dead_letters.list()
        assert loop.time() - started <= 5.01
        broker.thaw()
        accepted = await gateway.mediator.enqueue(Charge(amount=9))
        assert not accepted.duplicate
        broker.outage()  # down, not frozen: the store's own error, with the same word on it
        with pytest.raises(TransportError) as down:
            await gateway.mediator.enqueue(Charge(amount=10))
        assert down.value.details is not None and down.value.details["accepted"] is None
        broker.restore()
        await gateway.stop()

    run_virtual(scenario())
