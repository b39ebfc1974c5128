"""The promises about the user's own work, on a memory cluster: one run per handler error, one routing
decision, one outcome on every node, user errors crossing as themselves, a stopped node refusing."""

from __future__ import annotations

import asyncio
import sys
from collections import Counter
from typing import Any

import pytest

from fastapi_catga import (
    CatgaError,
    Command,
    MessageTooLargeError,
    NodeUnavailableError,
    RemoteHandlerError,
    RequestTimeoutError,
    RetryableError,
    TransportError,
    handler,
)
from fastapi_catga.core.envelope import NODE, STATUS, Envelope, encode_error, error_from_reply
from fastapi_catga.testing import InMemoryBroker
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


ERRORS: dict[str, Any] = {
    "transport": lambda: TransportError("the downstream broker blipped"),
    "timeout": lambda: RequestTimeoutError("the downstream call timed out"),
    "builtin-timeout": lambda: TimeoutError("socket timed out"),
    "out-of-stock": lambda: OutOfStock("apple"),
    "plain": lambda: ValueError("secret detail"),
    "retryable": lambda: RetryableError("try elsewhere"),
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
    ],
)
async def test_a_handlers_own_error_runs_it_once_on_every_path(
    start_node: StartNode, kind: str, error: type[CatgaError]
) -> None:
    a, b, _ = await cluster(start_node)
    for _ in range(6):  # round robin lands on each node, this one included
        command = Fail(kind=kind)
        with pytest.raises(error) as info:
            await a.mediator.send(command)
        assert type(info.value) is error
        assert runs[command.message_id] == 1, f"{kind}: ran {runs[command.message_id]} times"
    assert not any(a.node.view.is_suspect(n.node_id) for n in a.node.nodes()), "no node is to blame"
    alone = await start_node("alone", handlers=[sys.modules[__name__]], cluster="solo")
    command = Fail(kind=kind)
    with pytest.raises(error):  # the in-process fast path: the same rule
        await alone.mediator.send(command)
    assert runs[command.message_id] == 1


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
    with pytest.raises(RequestTimeoutError, match="no answer within 0.2 s"):
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
