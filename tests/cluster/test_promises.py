"""The promises about the user's own work, on a memory cluster: one run per handler error, one routing
decision, one outcome on every node, user errors crossing as themselves, a stopped node refusing."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import Counter
from collections.abc import Awaitable
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, field_serializer

from fastapi_catga import (
    CatgaError,
    Command,
    Event,
    HandlerNotFoundError,
    MessageTooLargeError,
    MessageValidationError,
    NodeUnavailableError,
    Query,
    RemoteHandlerError,
    Request,
    RequestTimeoutError,
    RetryableError,
    RetryLater,
    TransportError,
    handler,
)
from fastapi_catga.core.envelope import NODE, STATUS, Envelope, encode_error, encode_message, error_from_reply
from fastapi_catga.testing import InMemoryBroker, memory_node
from tests.cluster import workload
from tests.cluster.conftest import StartNode
from tests.polling import eventually
from tests.virtual_time import run_virtual, virtual_node

runs: Counter[str] = Counter()  # message id -> handler runs, on any node


class OutOfStock(CatgaError):
    """A user's own error class, with an __init__ of its own."""

    def __init__(self, sku: str) -> None:
        super().__init__(f"no {sku} left", details={"sku": sku})


class Fail(Command[str]):
    """Raises the error named by ``kind`` on whichever node runs it."""

    kind: str


class Keyed(Command[str]):
    key: str

    def routing_key(self) -> str:
        return self.key


class Big(Command[str]):
    blob: str


class WrongResult(Command[int]):
    pass


class Interrupted(BaseException):
    """A user's BaseException that is neither an exit nor a cancellation."""


class Unreadable(Exception):
    """An error whose text cannot be read: its __str__ raises."""

    def __str__(self) -> str:
        raise RuntimeError("no text")


class NoInit(CatgaError):
    """A user error class that never calls ``CatgaError.__init__``: no message, no node."""

    def __init__(self) -> None:
        pass


def _circular() -> CatgaError:
    details: dict[str, Any] = {}
    details["self"] = details  # no JSON can hold it
    return CatgaError("circular details", details=details)


ERRORS: dict[str, Any] = {
    # The handler's own CancelledError (no cancellation of its task): raised, or one of something
    # it awaited that was cancelled elsewhere.
    "cancelled": lambda: asyncio.CancelledError(),
    "base-exception": lambda: Interrupted(),
    "no-init": lambda: NoInit(),
    "circular-details": _circular,
    "transport": lambda: TransportError("the downstream broker blipped"),
    "timeout": lambda: RequestTimeoutError("the downstream call timed out"),
    "builtin-timeout": lambda: TimeoutError("socket timed out"),
    "out-of-stock": lambda: OutOfStock("apple"),
    "plain": lambda: ValueError("secret detail"),
    "unreadable": lambda: Unreadable(),
    "retryable": lambda: RetryableError("try elsewhere"),
    # A process exit or a generator's end raised by the handler itself (``sys.exit()`` in a library
    # it calls): its error, as uvicorn answers a route's. Raised on, it would end the node's loop,
    # and the caller, hearing nothing, would try (and end) the next node.
    "exit": lambda: SystemExit(3),
    "interrupt": lambda: KeyboardInterrupt(),
    "generator-exit": lambda: GeneratorExit(),  # answered in a run from the broker only
    # Class names of megabytes (generated): cut to fit a reply, on every path.
    "long-name": lambda: type("E" * 2_000_000, (Exception,), {})(),
    "long-catga-name": lambda: type("C" * 2_000_000, (CatgaError,), {})("generated"),
}


@handler
async def fail(command: Fail) -> str:
    runs[command.message_id] += 1
    raise ERRORS[command.kind]()


@handler
async def keyed(command: Keyed) -> str:
    runs[command.message_id] += 1
    return workload.current_node.get()


@handler
async def big(command: Big) -> str:
    return workload.current_node.get()


@handler
async def wrong_result(command: WrongResult) -> int:
    return "not a number"  # type: ignore[return-value]


def every_path(alone: Any, a: Any, message: Request[Any]) -> list[Awaitable[Any]]:
    """The one send run three ways: in-process on a node alone, and from ``a`` to itself and to b."""
    return [alone.mediator.send(message), *(a.mediator.send_to_node(message, n) for n in "ab")]


async def cluster(start_node: StartNode, size: int = 3, **settings: Any) -> list[Any]:
    module = sys.modules[__name__]
    nodes = [await start_node(name, handlers=[module], **settings) for name in "abc"[:size]]
    await eventually(lambda: all(len(n.node.nodes()) == size for n in nodes), within=2)
    return nodes


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        ("transport", TransportError),
        ("timeout", RequestTimeoutError),
        ("builtin-timeout", RemoteHandlerError),
        ("out-of-stock", OutOfStock),
        ("plain", RemoteHandlerError),
        ("cancelled", RemoteHandlerError),
        ("base-exception", RemoteHandlerError),
        ("no-init", NoInit),
        ("circular-details", CatgaError),
        ("exit", RemoteHandlerError),
        ("interrupt", RemoteHandlerError),
        ("long-name", RemoteHandlerError),
        ("long-catga-name", CatgaError),
    ],
)
async def test_a_handlers_own_error_runs_it_once_on_every_path(
    start_node: StartNode, kind: str, error: type[CatgaError]
) -> None:
    a, b, _ = await cluster(start_node)
    shapes = set()
    for _ in range(6):  # round robin lands on each node, this one included
        command = Fail(kind=kind)
        with pytest.raises(error) as info:
            await a.mediator.send(command)
        assert type(info.value) is error
        assert runs[command.message_id] == 1, f"{kind}: ran {runs[command.message_id]} times"
        shapes.add((info.value.code, getattr(info.value, "error_type", None)))
    assert not any(a.node.view.is_suspect(n.node_id) for n in a.node.nodes()), "no node is to blame"
    alone = await start_node("alone", handlers=[sys.modules[__name__]], cluster="solo")
    command = Fail(kind=kind)
    with pytest.raises(error) as info:  # the in-process fast path: the same rule
        await alone.mediator.send(command)
    assert runs[command.message_id] == 1
    shapes.add((info.value.code, getattr(info.value, "error_type", None)))
    assert len(shapes) == 1, shapes


async def test_a_handlers_generator_exit_is_answered_from_another_node_and_raised_here(
    start_node: StartNode,
) -> None:
    """In a run from the broker it is the handler's error (nothing else holds that coroutine);
    in the caller's own task it may be the caller's coroutine being closed, which must stay a
    close: it goes on up, as it did (README, Errors)."""
    a, b, _ = await cluster(start_node)
    command = Fail(kind="generator-exit")
    with pytest.raises(RemoteHandlerError, match="GeneratorExit"):
        await a.mediator.send_to_node(command, "b")
    assert runs[command.message_id] == 1
    with pytest.raises(GeneratorExit):
        await a.mediator.send_to_node(Fail(kind="generator-exit"), "a")


async def test_a_retryable_error_is_tried_on_each_node(start_node: StartNode) -> None:
    a, _, _ = await cluster(start_node)
    command = Fail(kind="retryable")
    with pytest.raises(RetryableError, match="try elsewhere"):
        await a.mediator.send(command)
    assert runs[command.message_id] == 3


async def test_a_user_error_class_crosses_the_wire_as_itself(start_node: StartNode) -> None:
    a, b, c = await cluster(start_node)
    for target in ("a", "b", "c"):
        with pytest.raises(OutOfStock) as info:
            await a.mediator.send_to_node(Fail(kind="out-of-stock"), target)
        assert (info.value.message, info.value.details, info.value.node_id) == (
            "no apple left",
            {"sku": "apple"},
            target,
        )


def test_a_user_error_class_this_process_lacks_arrives_as_its_nearest_known_base() -> None:
    reply = encode_error(OutOfStock("pear"), node_id="n1")
    body = reply.body.replace(b"test_promises.OutOfStock", b"elsewhere.Unknown")
    error = error_from_reply(Envelope({STATUS: "error", NODE: "n1"}, body))
    assert type(error) is CatgaError
    assert (error.message, error.details, error.node_id) == ("no pear left", {"sku": "pear"}, "n1")


async def test_the_handlers_text_stays_on_its_node_unless_exposed(start_node: StartNode) -> None:
    a, _, _ = await cluster(start_node)
    with pytest.raises(RemoteHandlerError) as info:
        await a.mediator.send_to_node(Fail(kind="plain"), "b")
    assert "secret detail" not in str(info.value)
    assert str(info.value).startswith("Fail handler raised ValueError on node b (message ")
    dev = await start_node("dev", handlers=[sys.modules[__name__]], cluster="dev", expose_errors=True)
    with pytest.raises(RemoteHandlerError, match="ValueError on node dev .*: secret detail"):
        await dev.mediator.send(Fail(kind="plain"))
    await start_node("exposed", handlers=[sys.modules[__name__]], cluster="dev", expose_errors=True)
    await eventually(lambda: len(dev.node.nodes()) == 2, within=2)
    for send in (
        dev.mediator.send(Fail(kind="unreadable")),
        dev.mediator.send_to_node(Fail(kind="unreadable"), "exposed"),
    ):
        with pytest.raises(RemoteHandlerError, match="its text could not be read") as raised:
            await send
        assert raised.value.error_type == "Unreadable"


@pytest.mark.parametrize("routing", ["round_robin", "random", "local_first"])
async def test_a_routing_key_runs_on_one_node_whichever_node_asks(
    start_node: StartNode, routing: str
) -> None:
    nodes = await cluster(start_node, routing=routing)
    for key in [f"order-{i}" for i in range(8)]:
        ran_on = {await node.mediator.send(Keyed(key=key)) for node in nodes for _ in range(3)}
        assert len(ran_on) == 1, f"{key} ran on {ran_on} under {routing}"


async def test_a_message_over_the_limit_is_refused_whichever_node_the_router_picks(
    start_node: StartNode,
) -> None:
    a, _, _ = await cluster(start_node, max_payload=64 * 1024)
    for _ in range(6):  # round robin: the local node is picked too
        with pytest.raises(MessageTooLargeError):
            await a.mediator.send(Big(blob="x" * 100_000))
    assert await a.mediator.send(Big(blob="x" * 1000)) in {"a", "b", "c"}


async def test_a_wrong_result_is_the_same_error_locally_and_remotely(start_node: StartNode) -> None:
    a, _, _ = await cluster(start_node)
    errors = []
    for target in ("a", "b"):
        with pytest.raises(RemoteHandlerError) as info:
            await a.mediator.send_to_node(WrongResult(), target)
        errors.append((type(info.value), info.value.error_type))
    assert errors == [(RemoteHandlerError, "ResultValidationError")] * 2


async def test_the_in_process_path_is_bounded_by_the_request_timeout(start_node: StartNode) -> None:
    alone = await start_node("alone", request_timeout=0.2)
    # In the words of a send that another node ran out of time on (`attempts.final_error`).
    with pytest.raises(RequestTimeoutError, match=r"no answer within 0.2 s \(1 attempt\(s\)\)$"):
        await alone.mediator.send(workload.Work(delay=5))


async def test_a_stopped_node_refuses_every_call_at_once(start_node: StartNode) -> None:
    a, _, _ = await cluster(start_node)
    await a.stop()
    with pytest.raises(NodeUnavailableError, match="stopped"):
        await a.mediator.send(Keyed(key="k"))
    with pytest.raises(NodeUnavailableError, match="stopped"):
        await a.mediator.send(workload.Work())  # a type only this node... or any: refused either way
    with pytest.raises(NodeUnavailableError, match="stopped"):
        await a.mediator.broadcast(Keyed(key="k"))


class Relay(Command[str]):
    """Waits, then sends a keyed command on through the node that runs it."""


relay_through: list[Any] = []  # the mediator the relay handler sends through


@handler
async def relay(command: Relay) -> str:
    await asyncio.sleep(0.3)
    return str(await relay_through[0].send(Keyed(key="k")))


async def test_a_handler_still_draining_may_send_and_calls_after_stop_fail(start_node: StartNode) -> None:
    a, b, _ = await cluster(start_node)
    relay_through[:] = [a.mediator]
    running = asyncio.create_task(b.mediator.send_to_node(Relay(), "a"))  # a's responder runs it
    await asyncio.sleep(0.1)  # stop a while its handler is running
    await a.stop()
    assert await running in {"a", "b", "c"}, "the draining handler's own send went through"
    with pytest.raises(NodeUnavailableError, match="stopped"):
        await a.mediator.send(Relay())


def test_a_stopping_node_unsubscribes_everything_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each unsubscribe may wait for the broker's confirmation (Redis does, up to its command
    timeout): a stop waits for the slowest, not for their sum."""
    unsubscribed: list[str] = []

    async def slow_unsubscribe(self: Any) -> None:
        unsubscribed.append(self.subject)
        await asyncio.sleep(1)

    monkeypatch.setattr("fastapi_catga.transports.memory._Sub.unsubscribe", slow_unsubscribe)

    async def scenario() -> float:
        broker = InMemoryBroker(clock=asyncio.get_running_loop().time)
        node = virtual_node(broker, "a", handlers=[workload], drain_timeout=0)
        await node.start()
        loop = asyncio.get_running_loop()
        began = loop.time()
        await node.stop()
        return loop.time() - began

    took = run_virtual(scenario())
    assert len(unsubscribed) >= 3, unsubscribed
    # One wait as the drain begins, one for the durable results' subscription after it (6 before).
    assert took <= 2, f"stop took {took:.1f} s for {len(unsubscribed)} unsubscribes of 1 s each"


class Cancels(Command[str]):
    """Its handler raises a CancelledError of its own when ``own``, else waits to be cancelled;
    ``stubborn``: it ignores each cancellation, for 60 s."""

    own: bool
    stubborn: bool = False


@handler
async def cancels(command: Cancels) -> str:
    if command.own:
        raise asyncio.CancelledError
    if command.stubborn:
        until = asyncio.get_running_loop().time() + 60
        while asyncio.get_running_loop().time() < until:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(1)
        return "late"
    await asyncio.sleep(10)
    return "never"


@pytest.mark.parametrize(("capable", "stubborn"), [(1, False), (2, False), (1, True)])
def test_a_run_cut_by_its_nodes_stop_is_answered_at_once(capable: int, stubborn: bool) -> None:
    """A stopping node that cancels a run at the end of its drain says so: its caller tries
    another node, or gives up, at once rather than at its deadline (20 s here). A run whose
    handler ignores the cancellation is abandoned a second later, and answered then."""

    async def scenario() -> tuple[float, str]:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        module = [sys.modules[__name__]]
        workers = [virtual_node(broker, f"w{i}", handlers=module, drain_timeout=0.5) for i in range(capable)]
        caller = virtual_node(broker, "caller", handlers=[], routing="round_robin")
        for node in (*workers, caller):
            await node.start()
        await eventually(lambda: len(caller.node.nodes()) == capable + 1, within=5)
        began = loop.time()
        sending = asyncio.create_task(caller.mediator.send(Cancels(own=False, stubborn=stubborn), timeout=20))
        await asyncio.sleep(0.1)
        running = [w for w in workers if w.node.limits.in_flight]
        await running[0].stop()
        try:
            outcome = repr(await sending)
        except CatgaError as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        took = loop.time() - began
        for node in (caller, *workers):
            if node is not running[0]:
                await node.stop()
        return took, outcome

    took, outcome = run_virtual(scenario())
    if capable == 1:
        assert outcome.startswith("NodeUnavailableError: node w0 stopped while running Cancels"), outcome
        assert took < (2.5 if stubborn else 1.5), f"answered after {took:.1f} s"
    else:  # the other node ran it (its handler waits 10 s before it would answer)
        assert took < 12, f"answered after {took:.1f} s: {outcome}"


def test_a_broadcast_is_not_held_past_its_deadline_by_a_handler_here_that_ignores_cancellation() -> None:
    """Under one deadline: the entry of this node's run that will not end is a timeout, as a
    silent node's is, a second after the deadline; the other nodes' entries come back with it."""

    async def scenario() -> tuple[float, dict[str, Any]]:
        loop = asyncio.get_running_loop()
        broker = InMemoryBroker(clock=loop.time)
        module = [sys.modules[__name__]]
        a = virtual_node(broker, "a", handlers=module, drain_timeout=0)
        b = virtual_node(broker, "b", handlers=[workload], drain_timeout=0)
        for node in (a, b):
            await node.start()
        await eventually(lambda: len(a.node.nodes()) == 2, within=5)
        began = loop.time()
        results = await a.mediator.broadcast(Cancels(own=False, stubborn=True), timeout=2)
        took = loop.time() - began
        for node in (a, b):
            await node.stop()
        return took, results

    took, results = run_virtual(scenario())
    assert took <= 3.5, f"the broadcast returned after {took:.1f} s"
    assert isinstance(results["a"], RequestTimeoutError) and results["a"].node_id == "a", results
    assert isinstance(results["b"], HandlerNotFoundError), results


async def test_a_cancelled_error_is_the_handlers_only_when_its_task_is_not_being_cancelled(
    start_node: StartNode,
) -> None:
    a, b, _ = await cluster(start_node)
    with pytest.raises(RemoteHandlerError) as info:  # its own: an answer, on b
        await a.mediator.send_to_node(Cancels(own=True), "b")
    assert info.value.error_type == "CancelledError"
    running = asyncio.create_task(a.mediator.send(Cancels(own=False)))  # a real cancellation ...
    await asyncio.sleep(0.05)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):  # ... stays one
        await running
    with pytest.raises(RequestTimeoutError):  # the deadline's too (here and on each other node)
        await a.mediator.send(Cancels(own=False), timeout=0.2)


class Noted(Event):
    kind: str


noted: list[str] = []


@handler
async def noted_first(event: Noted) -> None:
    noted.append(f"first {event.kind}")
    raise ERRORS[event.kind]()


@handler
async def noted_second(event: Noted) -> None:
    noted.append(f"second {event.kind}")


@pytest.mark.parametrize("kind", ["cancelled", "base-exception", "plain", "exit", "interrupt"])
async def test_an_event_handler_that_raises_anything_stops_no_other_and_never_reaches_the_publisher(
    start_node: StartNode, kind: str
) -> None:
    a, _ = await cluster(start_node, size=2)
    noted.clear()
    await a.mediator.publish(Noted(kind=kind))
    await eventually(
        lambda: noted.count(f"second {kind}") == 2, within=2, message="each node's second handler"
    )
    assert sorted(noted) == sorted([f"first {kind}", f"second {kind}"] * 2)


async def test_a_broadcast_gets_an_answer_from_every_node_whatever_its_handler_raised(
    start_node: StartNode,
) -> None:
    a, _, _ = await cluster(start_node)
    before = set(asyncio.all_tasks())
    results = await a.mediator.broadcast(Cancels(own=True))
    assert sorted(results) == ["a", "b", "c"]
    assert all(isinstance(error, RemoteHandlerError) for error in results.values()), results
    assert {task for task in asyncio.all_tasks() if not task.done()} <= before, "no run left behind"


async def test_a_message_or_result_over_the_limit_is_refused_on_every_path(start_node: StartNode) -> None:
    a, _, _ = await cluster(start_node, max_payload=64 * 1024)
    alone = await start_node("alone", handlers=[sys.modules[__name__]], cluster="solo", max_payload=64 * 1024)
    big_message, big_result = Big(blob="x" * 100_000), Echoed(size=100_000)
    with pytest.raises(MessageTooLargeError, match="payload limit"):  # in-process: only this node
        await alone.mediator.send(big_message)
    with pytest.raises(MessageTooLargeError, match="the result is") as refused:
        await alone.mediator.send(big_result)
    assert refused.value.node_id == "alone", "the node that ran it, on every path"
    for target in ("a", "b"):  # here, and on another node
        with pytest.raises(MessageTooLargeError, match="payload limit"):
            await a.mediator.send_to_node(big_message, target)
        with pytest.raises(MessageTooLargeError, match="the result is") as refused:
            await a.mediator.send_to_node(big_result, target)
        assert refused.value.node_id == target
    results = await a.mediator.broadcast(big_result)
    assert all(isinstance(error, MessageTooLargeError) for error in results.values()), results
    assert {node: error.node_id for node, error in results.items()} == {n: n for n in "abc"}
    assert await alone.mediator.send(Echoed(size=5)) == "xxxxx"


class Echoed(Command[str]):
    """Answers ``size`` characters: a small message, a result as large as asked."""

    size: int


@handler
async def echoed(command: Echoed) -> str:
    return "x" * command.size


class Anything(Query[Any]):
    """A query whose result is declared ``Any``: JSON or not, only the wire tells."""


@handler
async def anything(query: Anything) -> Any:
    return object()


async def test_a_result_that_is_no_json_is_the_same_error_here_and_on_another_node(
    start_node: StartNode,
) -> None:
    a, _, _ = await cluster(start_node)
    alone = await start_node("alone", handlers=[sys.modules[__name__]], cluster="solo")
    errors = []
    for send in (alone.mediator.send(Anything()), *(a.mediator.send_to_node(Anything(), n) for n in "ab")):
        with pytest.raises(RemoteHandlerError, match="is not JSON") as info:
            await send
        errors.append(info.value.error_type)
    assert errors == ["PydanticSerializationError"] * 3


class Shelf(BaseModel):
    """A result model whose JSON is not what it holds: a serializer doubles its counts."""

    weight: float
    counts: list[int] = []

    @field_serializer("counts")
    def _doubled(self, counts: list[int]) -> list[int]:
        return [count * 2 for count in counts]


SHARED_SHELF = Shelf(weight=1.0, counts=[1, 2])  # a handler's own object, handed out each time


class Reshaped(Query[Any]):
    """Answers what JSON reshapes: ``what`` names it."""

    what: str


@handler
async def reshaped(query: Reshaped) -> Any:
    return {"set": {3, 1}, "tuple": (1, "a")}[query.what]


class Shouted(Query[Annotated[str, PlainSerializer(str.upper)]]):
    """A str result with a serializer of its own: what arrives is the serializer's output."""


@handler
async def shouted(query: Shouted) -> str:
    return "alice"


class GetShelf(Query[Shelf]):
    """Answers the handler's shared shelf, or one holding a NaN weight (JSON writes ``null``)."""

    nan: bool = False


@handler
async def get_shelf(query: GetShelf) -> Shelf:
    return Shelf(weight=float("nan")) if query.nan else SHARED_SHELF


async def test_a_result_reads_back_from_its_json_on_every_path(start_node: StartNode) -> None:
    """Here as on another node: a set in an `Any` comes back a list, a serializer's output is what
    arrives, and the caller gets its own copy, never the object the handler keeps."""
    a, _, _ = await cluster(start_node)
    alone = await start_node("alone", handlers=[sys.modules[__name__]], cluster="solo")

    for what, expected in (("set", [1, 3]), ("tuple", [1, "a"])):
        assert [await send for send in every_path(alone, a, Reshaped(what=what))] == [expected] * 3
    assert [await send for send in every_path(alone, a, Shouted())] == ["ALICE"] * 3
    for send in every_path(alone, a, GetShelf()):
        shelf = await send
        assert shelf == Shelf(weight=1.0, counts=[2, 4]) and shelf is not SHARED_SHELF
    for send in every_path(alone, a, GetShelf(nan=True)):
        with pytest.raises(MessageValidationError, match="does not match the result type"):
            await send
    assert SHARED_SHELF.counts == [1, 2]


class Aliased(Command[str]):
    """A message, and a result, with camelCase aliases, as an API's models often have."""

    user_id: int = Field(alias="userId")


class Account(BaseModel):
    user_id: int = Field(alias="userId")


class Described(Query[Account]):
    """Describes what its handler got: ``what`` picks the message shape."""

    what: str
    weight: float = 1.0
    anything: Any = None
    counts: list[int] = []

    @field_serializer("counts")
    def _doubled(self, counts: list[int]) -> list[int]:
        return [count * 2 for count in counts]


described: list[tuple[Any, ...]] = []


@handler
async def aliased(command: Aliased) -> str:
    return f"user {command.user_id}"


class OpenAccount(Command[str]):
    """A message whose aliases are in a model it holds."""

    account: Account


@handler
async def open_account(command: OpenAccount) -> str:
    return f"account {command.account.user_id}"


@handler
async def describe(query: Described) -> Account:
    described.append((query.weight, query.anything, list(query.counts)))
    query.counts.append(99)  # a handler that changes what it was given
    return Account(userId=len(query.counts))


async def test_a_message_reads_as_its_json_reads_on_every_path(start_node: StartNode) -> None:
    """The handler gets the message as another node would read it: aliases cross, a tuple in an
    `Any` is a list, a serializer's output is what arrives, and the caller's object is its own."""
    a, _, _ = await cluster(start_node)
    alone = await start_node("alone", handlers=[sys.modules[__name__]], cluster="solo")

    assert [await send for send in every_path(alone, a, Aliased(userId=7))] == ["user 7"] * 3
    assert [await send for send in every_path(alone, a, OpenAccount(account=Account(userId=8)))] == [
        "account 8"
    ] * 3
    described.clear()
    message = Described(what="shape", anything=(1, "a"), counts=[1])
    assert [(await send).user_id for send in every_path(alone, a, message)] == [2] * 3
    assert described == [(1.0, [1, "a"], [2])] * 3 and message.counts == [1]
    for send, node in zip(
        every_path(alone, a, Described(what="nan", weight=float("nan"))), ["alone", "a", "b"], strict=True
    ):
        with pytest.raises(MessageValidationError, match="invalid Described") as refused:  # JSON writes null
            await send
        assert refused.value.node_id == node, "the node that could not read it, on every path"
    assert len(described) == 3, "a message another node cannot read ran here"


class Charge(Command[str]):
    """Plain fields, one constrained: a message a run here may hand over as it is."""

    cents: Annotated[int, Field(ge=0)]
    note: str | None = None


class Rename(Command[str]):
    """Not frozen: a handler can set its fields."""

    model_config = ConfigDict(frozen=False)

    name: str


@handler
async def charge(command: Charge) -> str:
    return f"{type(command.cents).__name__} {command.cents}"


@handler
async def rename(command: Rename) -> str:
    command.name = command.name.upper()
    return command.name


@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings")  # pydantic's own, on every path
async def test_a_message_pydantic_never_validated_reads_as_another_node_reads_it(
    start_node: StartNode,
) -> None:
    """``model_copy(update=...)`` and ``model_construct`` skip validation: a run here must not take
    what another node's validation refuses, nor hand over what it would change."""
    a, _, _ = await cluster(start_node)
    alone = await start_node("alone", handlers=[sys.modules[__name__]], cluster="solo")

    valid = Charge(cents=5)
    refused = [
        valid.model_copy(update={"cents": "100; DROP TABLE"}),
        valid.model_copy(update={"cents": -1}),  # breaks the constraint
        valid.model_copy(update={"note": 5}),
        valid.model_copy(update={"message_id": "a\nb"}),
        Charge.model_construct(cents=[1, 2]),  # type: ignore[arg-type]
        Charge.model_construct(note="no cents"),  # type: ignore[call-arg]
    ]
    for message in refused:
        for send in every_path(alone, a, message):
            with pytest.raises(MessageValidationError):
                await send
    assert [await send for send in every_path(alone, a, valid.model_copy(update={"cents": "7"}))] == [
        "int 7"
    ] * 3
    assert [await send for send in every_path(alone, a, valid.model_copy(update={"cents": True}))] == [
        "int 1"
    ] * 3
    assert [await send for send in every_path(alone, a, valid)] == ["int 5"] * 3


async def test_a_handler_that_changes_its_message_never_changes_the_callers(start_node: StartNode) -> None:
    a, _, _ = await cluster(start_node)
    alone = await start_node("alone", handlers=[sys.modules[__name__]], cluster="solo")
    message = Rename(name="alice")
    sends = [alone.mediator.send(message), *(a.mediator.send_to_node(message, n) for n in "ab")]
    assert [await send for send in sends] == ["ALICE"] * 3
    assert message.name == "alice"


class PlaceCopy(Command[str]):
    """A second class of the wire name `Aliased` has: a client's own copy of the message."""

    type_name = Aliased.type_name

    user_id: int = Field(alias="userId")


async def test_a_copy_of_a_message_class_runs_as_the_registered_one_on_every_path(
    start_node: StartNode,
) -> None:
    a, _, _ = await cluster(start_node)
    alone = await start_node("alone", handlers=[sys.modules[__name__]], cluster="solo")
    sends = [alone.mediator.send(PlaceCopy(userId=3)), a.mediator.send(PlaceCopy(userId=3))]
    sends += [a.mediator.send_to_node(PlaceCopy(userId=3), n) for n in "ab"]
    assert [await send for send in sends] == ["user 3"] * 4


class Noticed(Event):
    """An event with an alias, or a float that JSON cannot carry."""

    user_id: int = Field(alias="userId")
    weight: float = 1.0
    note: str = ""


noticed: list[tuple[str, int]] = []


@handler
async def noticed_by(event: Noticed) -> None:
    noticed.append((workload.current_node.get(), event.user_id))


async def test_an_event_reaches_every_node_as_it_reads_here_or_is_refused_before_any_runs(
    start_node: StartNode,
) -> None:
    a, _, _ = await cluster(start_node)
    noticed.clear()
    await a.mediator.publish(Noticed(userId=5))
    await eventually(lambda: sorted(noticed) == [("a", 5), ("b", 5), ("c", 5)], within=2)
    noticed.clear()
    with pytest.raises(MessageValidationError, match="invalid Noticed"):
        await a.mediator.publish(Noticed(userId=6, weight=float("nan")))  # others would drop it
    alone = await start_node("alone", handlers=[sys.modules[__name__]], cluster="solo")
    with pytest.raises(MessageValidationError, match="invalid Noticed"):
        await alone.mediator.publish(Noticed(userId=6, weight=float("nan")))
    with pytest.raises(MessageTooLargeError):  # alone as with other nodes, which it may soon have
        await alone.mediator.publish(Noticed(userId=7, note="x" * 2 * 1024 * 1024))
    assert noticed == []


async def test_a_message_no_json_can_carry_is_a_validation_error_on_every_path(
    start_node: StartNode,
) -> None:
    """A lone surrogate from a client's JSON (``"\\ud800"``), an object in an `Any` field: nothing
    runs anywhere, and the caller gets `MessageValidationError` (422), not pydantic's own error (500)."""
    a, _, _ = await cluster(start_node)
    alone = await start_node("alone", handlers=[sys.modules[__name__]], cluster="solo")
    described.clear()
    noticed.clear()
    for message in (Described(what="\ud800"), Described(what="shape", anything=object())):
        calls = [
            alone.mediator.send(message),
            a.mediator.send(message),
            *(a.mediator.send_to_node(message, n) for n in "ab"),
        ]
        for call in calls:
            with pytest.raises(MessageValidationError, match="no JSON can carry it"):
                await call
        answers = await a.mediator.broadcast(message)  # as with a NaN: an entry per node
        assert sorted(answers) == ["a", "b", "c"]
        assert all(isinstance(answer, MessageValidationError) for answer in answers.values())
    for catga in (a, alone):
        with pytest.raises(MessageValidationError, match="no JSON can carry it"):
            await catga.mediator.publish(Noticed(userId=8, note="\udfff"))
    assert described == [] and noticed == []


class Stalls(Command[str]):
    """Its handler holds the event loop (a blocking call) for ``seconds``."""

    seconds: float


stalled_on: list[str] = []


@handler
async def stalls(command: Stalls) -> str:
    node = workload.current_node.get()
    stalled_on.append(node)
    time.sleep(command.seconds)  # the point: the loop stalls
    return node


async def test_a_broadcast_sends_nothing_more_once_its_deadline_passed(start_node: StartNode) -> None:
    a, b, c = await cluster(start_node)
    stalled_on.clear()
    results = await a.mediator.broadcast(Stalls(seconds=0.3), timeout=0.1)  # a's own run comes first
    assert stalled_on == ["a"]
    assert isinstance(results["b"], RequestTimeoutError) and isinstance(results["c"], RequestTimeoutError)
    for name in ("b", "c"):  # answered after anything sent to them before
        assert await a.mediator.send_to_node(Stalls(seconds=0), name) == name
    dropped = [node.node.responder.stats["expired_dropped"] for node in (b, c)]
    assert dropped == [0, 0], "requests their deadline had passed were sent, only to be dropped"


class OddText(Query[str]):
    """Answers a str no JSON can hold: a lone surrogate."""


class OddNumber(Query[float]):
    """Answers a float no JSON number can be."""


@handler
async def odd_text(query: OddText) -> str:
    return "ab\ud800"


@handler
async def odd_number(query: OddNumber) -> float:
    return float("nan")


@pytest.mark.parametrize("query", [OddText, OddNumber])
async def test_a_str_or_float_no_json_can_hold_is_the_same_error_here_and_elsewhere(
    start_node: StartNode, query: type[Query[Any]]
) -> None:
    a, _, _ = await cluster(start_node)
    alone = await start_node("alone", handlers=[sys.modules[__name__]], cluster="solo")
    for send in (alone.mediator.send(query()), *(a.mediator.send_to_node(query(), n) for n in "ab")):
        with pytest.raises(RemoteHandlerError, match="is not JSON"):
            await send


async def test_a_message_just_under_the_limit_before_its_attempt_headers_is_refused_everywhere(
    start_node: StartNode,
) -> None:
    """Each attempt adds headers (its deadline, its trace context) after the size check: a message
    that fits only without them is refused the same here and on another node, never by the broker."""
    limit = 64 * 1024
    a, _, _ = await cluster(start_node, max_payload=limit)
    alone = await start_node("alone", handlers=[sys.modules[__name__]], cluster="solo", max_payload=limit)
    probe = Big(blob="")
    size = encode_message(probe, source="alone", max_payload=limit).size()
    message = Big(blob="x" * (limit - size - 20))  # 20 bytes under the limit, before an attempt's headers
    for send in (
        alone.mediator.send(message),
        a.mediator.send_to_node(message, "a"),
        a.mediator.send_to_node(message, "b"),
    ):
        with pytest.raises(MessageTooLargeError, match="payload limit"):
            await send


async def test_an_in_process_run_that_holds_the_loop_past_its_deadline_times_out(
    start_node: StartNode,
) -> None:
    alone = await start_node("alone", handlers=[sys.modules[__name__]], cluster="solo")
    with pytest.raises(RequestTimeoutError, match="no answer within 0.05 s"):
        await alone.mediator.send(Stalls(seconds=0.2), timeout=0.05)  # it never suspends: no timer fires
    assert await alone.mediator.send(Stalls(seconds=0.0), timeout=0.5) == "alone"


async def test_a_run_here_past_its_share_but_within_the_deadline_keeps_its_result(
    start_node: StartNode,
) -> None:
    """Its caller is this task and still waits: the result it has is kept, not run again elsewhere."""
    a, _ = await cluster(start_node, size=2, routing="local_first")
    stalled_on.clear()
    assert await a.mediator.send(Stalls(seconds=0.3), timeout=0.5) == "a"  # its share: 0.25 s of 0.5
    assert stalled_on == ["a"]


async def test_a_run_here_past_the_whole_deadline_times_out_as_it_would_elsewhere(
    start_node: StartNode,
) -> None:
    a, b = await cluster(start_node, size=2, routing="local_first")
    stalled_on.clear()
    with pytest.raises(RequestTimeoutError, match="no answer within 0.1 s"):
        await a.mediator.send(Stalls(seconds=0.3), timeout=0.1)
    assert stalled_on == ["a"]  # run once: no other node was tried after the deadline
    with pytest.raises(RequestTimeoutError, match="no answer within 0.1 s"):
        await a.mediator.send_to_node(Stalls(seconds=0.3), "a", timeout=0.1)
    results = await b.mediator.broadcast(Stalls(seconds=0.3), timeout=0.1)
    assert isinstance(results["b"], RequestTimeoutError), results
    for target in ("a", "b"):  # in the same words whichever node ran out of time, and however
        for message in (Cancels(own=False), Stalls(seconds=0.3)):
            with pytest.raises(
                RequestTimeoutError,
                match=f"{message.type_name} .*: no answer within 0.1 s from node {target}$",
            ) as raised:
                await a.mediator.send_to_node(message, target, timeout=0.1)
            assert raised.value.node_id == target


class CancelsItself(Command[str]):
    """Its handler cancels the task it runs in, then suspends."""


cancelled_itself: list[str] = []


@handler
async def cancels_itself(command: CancelsItself) -> str:
    cancelled_itself.append(workload.current_node.get())
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    await asyncio.sleep(0)
    return "not reached"


async def test_a_handler_that_cancels_its_own_run_on_another_node_is_its_error_and_runs_once(
    start_node: StartNode,
) -> None:
    """The node did not stop: answered "stopped", the caller would fail over and run it again."""
    a, _, _ = await cluster(start_node)
    for target in "bc":
        cancelled_itself.clear()
        with pytest.raises(RemoteHandlerError) as raised:
            await a.mediator.send_to_node(CancelsItself(), target)
        assert raised.value.error_type == "CancelledError" and raised.value.node_id == target
        assert cancelled_itself == [target]
    caller = await start_node("d", handlers=[])
    await eventually(lambda: len(caller.node.nodes()) == 4, within=2)
    cancelled_itself.clear()
    with pytest.raises(RemoteHandlerError, match="CancelledError"):
        await caller.mediator.send(CancelsItself())
    assert len(cancelled_itself) == 1, f"retried on another node: ran on {cancelled_itself}"


class Computed(CatgaError):
    """A user's error class whose ``retryable`` is a read-only property: no copy can set it."""

    code = "computed"

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        return True


class RaisesOurs(Command[str]):
    """Its handler raises one of ours, of the shape ``kind`` names."""

    kind: str


@handler
async def raises_ours(command: RaisesOurs) -> str:
    if command.kind == "huge":
        raise CatgaError("y" * 3_000_000, details={"d": "z" * 2_000_000})
    if command.kind == "odd-details":
        raise CatgaError("bad", details={"s": {1, 2}, "raw": b"\x00"})
    if command.kind == "no-init":
        raise NoInit()
    if command.kind == "property":
        raise Computed("computed")
    raise RetryLater("the bank is busy", delay=2.5)


async def test_an_error_of_ours_reaches_the_caller_the_same_wherever_the_handler_ran(
    start_node: StartNode,
) -> None:
    """In-process as across nodes: the error as its reply carries it (a text cut to the payload
    limit, details as JSON, a class whose ``__init__`` skipped ours readable, a delay kept)."""
    a, _, _ = await cluster(start_node)
    alone = await start_node("alone", handlers=[sys.modules[__name__]], cluster="solo")

    def shape(error: BaseException) -> tuple[Any, ...]:
        assert isinstance(error, CatgaError)
        return (type(error), str(error), error.details, error.retryable, getattr(error, "delay", None))

    for kind in ("huge", "odd-details", "no-init", "property", "later"):
        message = RaisesOurs(kind=kind)
        outcomes = []
        for send in (alone.mediator.send(message), *(a.mediator.send_to_node(message, n) for n in "ab")):
            with pytest.raises(CatgaError) as raised:
                await send
            outcomes.append(shape(raised.value))
        assert outcomes[0] == outcomes[1] == outcomes[2], kind
        if kind == "later":
            assert outcomes[0][4] == 2.5
        if kind == "huge":
            assert len(outcomes[0][1]) < 2000
        if kind == "property":  # its nearest base that takes what crossed: answered, not timed out
            assert outcomes[0][:2] == (CatgaError, "computed")


class StrictGuard:
    """A behavior whose composed step is, by mistake, a plain def: it raises before any coroutine."""

    async def __call__(self, message: Any, call_next: Any) -> Any:
        return await call_next()

    def compose(self, inner: Any) -> Any:
        def step(message: Any) -> Any:
            if isinstance(message, Charge) and message.cents == 0:
                raise ValueError("nothing to charge")
            return inner(message)

        return step


async def test_a_behavior_step_that_raises_before_the_handler_is_its_error_on_every_path() -> None:
    broker = InMemoryBroker()
    module = sys.modules[__name__]
    alone = memory_node(broker, handlers=[module], behaviors=[StrictGuard()], node_id="alone", cluster="solo")
    worker = memory_node(broker, handlers=[module], behaviors=[StrictGuard()], node_id="worker")
    caller = memory_node(broker, handlers=[], node_id="caller")
    for node in (alone, worker, caller):
        await node.start()
    try:
        await eventually(lambda: len(caller.node.nodes()) == 2, within=2)
        for send in (alone.mediator.send(Charge(cents=0)), caller.mediator.send(Charge(cents=0))):
            with pytest.raises(RemoteHandlerError) as raised:
                await send
            assert raised.value.error_type == "ValueError"
    finally:
        for node in (alone, worker, caller):
            await node.stop()
