"""Two versions of one app in one cluster (in memory): a type is not routed to a node whose schema of
it is incompatible, said once in the log, and refused with a clear error when no node is left."""

from __future__ import annotations

import logging
from collections import Counter
from typing import ClassVar

import pytest

from fastapi_catga import (
    Command,
    Durable,
    Event,
    IncompatibleSchemaError,
    NodeUnavailableError,
    Query,
    handler,
)
from tests.cluster.conftest import StartNode
from tests.polling import eventually


class AskV1(Query[str]):
    type_name: ClassVar[str] = "ask"
    text: str


class AskOptional(Query[str]):  # v2, compatible: a field with a default
    type_name: ClassVar[str] = "ask"
    text: str
    loud: bool = False


class AskRequired(Query[str]):  # v2, incompatible: a required field
    type_name: ClassVar[str] = "ask"
    text: str
    lang: str


class Noted(Event):
    type_name: ClassVar[str] = "noted"
    text: str


class NotedV2(Event):
    type_name: ClassVar[str] = "noted"
    text: int


@handler
async def ask_v1(query: AskV1) -> str:
    return "v1"


@handler
async def ask_optional(query: AskOptional) -> str:
    return "v2"


@handler
async def ask_required(query: AskRequired) -> str:
    return "v2"


@handler
async def noted(event: Noted) -> None:
    pass


@handler
async def noted_v2(event: NotedV2) -> None:
    pass


async def test_a_compatible_change_is_routed_to_both_versions(start_node: StartNode) -> None:
    old = await start_node("old", handlers=[ask_v1], app_version="1.0")
    await start_node("new", handlers=[ask_optional], app_version="2.0")
    await eventually(lambda: len(old.node.nodes()) == 2, within=1)
    served = Counter([await old.mediator.send(AskV1(text="hi")) for _ in range(10)])
    assert served == {"v1": 5, "v2": 5}
    assert old.node.view.schemas.incompatibilities(old.node.view.get("new")) == {}  # type: ignore[arg-type]


async def test_an_incompatible_change_is_not_routed_and_logged_once(
    start_node: StartNode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fastapi_catga.cluster.compat")
    old = await start_node("old", handlers=[ask_v1, noted], app_version="1.0")
    new = await start_node("new", handlers=[ask_required, noted_v2], app_version="2.0")
    await eventually(lambda: len(old.node.nodes()) == 2 and len(new.node.nodes()) == 2, within=1)

    assert [await old.mediator.send(AskV1(text="hi")) for _ in range(6)] == ["v1"] * 6
    # The new version may send to the old one: the old one ignores the field it does not know.
    assert Counter([await new.mediator.send(AskRequired(text="hi", lang="en")) for _ in range(6)]) == {
        "v1": 3,
        "v2": 3,
    }
    new_info = old.node.view.get("new")
    assert new_info is not None and new_info.app_version == "2.0"
    assert old.node.view.schemas.incompatibilities(new_info) == {
        "ask": "message field 'lang': required on node new, absent on this node",
        "noted": "message field 'text': its type differs between node new and this node",
    }
    with pytest.raises(IncompatibleSchemaError) as refused:
        await old.mediator.send_to_node(AskV1(text="hi"), "new")
    assert refused.value.details == {
        "new": ["message field 'lang': required on node new, absent on this node"]
    }
    answers = await old.mediator.broadcast(AskV1(text="hi"))
    assert answers["old"] == "v1" and isinstance(answers["new"], IncompatibleSchemaError)

    # Once per peer and type, however many sends; each node warns about the other.
    warnings = [r.getMessage() for r in caplog.records if "incompatible" in r.getMessage()]
    assert sorted(w for w in warnings if w.startswith("node new")) == [
        "node new (app 2.0) has an incompatible ask schema (this node does not send it there): "
        "message field 'lang': required on node new, absent on this node",
        "node new (app 2.0) has an incompatible noted schema (events of it published here may fail "
        "to decode there): message field 'text': its type differs between node new and this node",
    ]
    assert [w for w in warnings if w.startswith("node old")] == [
        "node old (app 1.0) has an incompatible noted schema (events of it published here may fail "
        "to decode there): message field 'text': its type differs between node old and this node",
    ]


async def test_when_only_incompatible_nodes_handle_it_send_fails_clearly(start_node: StartNode) -> None:
    caller = await start_node("caller", handlers=[], app_version="1.0")
    await start_node("new", handlers=[ask_required], app_version="2.0")
    await eventually(lambda: len(caller.node.nodes()) == 2, within=1)
    with pytest.raises(IncompatibleSchemaError) as refused:
        await caller.mediator.send(AskV1(text="hi"), timeout=1)
    assert isinstance(refused.value, NodeUnavailableError)  # 503 over HTTP, like any "no node"
    text = str(refused.value)
    assert "no node with a compatible ask schema" in text
    assert "new (app 2.0): message field 'lang': required on node new, absent on this node" in text
    assert refused.value.details == {
        "new": ["message field 'lang': required on node new, absent on this node"]
    }
    # Another class of the same type name, compatible with the new node, goes there.
    assert await caller.mediator.send(AskRequired(text="hi", lang="en")) == "v2"


class JobV1(Command[str]):
    type_name: ClassVar[str] = "job"
    durable: ClassVar[Durable | bool] = True
    a: int


class JobV2(Command[str]):  # v2, incompatible: a required field
    type_name: ClassVar[str] = "job"
    durable: ClassVar[Durable | bool] = True
    a: int
    b: int


@handler
async def job_v2(command: JobV2) -> str:
    return "v2"


async def test_a_node_that_only_enqueues_compares_the_type_too(
    start_node: StartNode, caplog: pytest.LogCaptureFixture
) -> None:
    """Durable messages are not filtered (the queue hands them to any node of its group), but the
    gateway that enqueues them says, as for a plain send, that the handlers run another version."""
    gateway = await start_node("gateway", handlers=[], app_version="1.0")
    await start_node("h2", handlers=[job_v2], app_version="2.0")
    await eventually(lambda: len(gateway.node.nodes()) == 2, within=1)
    await gateway.mediator.enqueue(JobV1(a=1))
    assert "node h2 (app 2.0) has an incompatible job schema" in caplog.text, "said by the enqueue"
    h2 = gateway.node.view.get("h2")
    assert h2 is not None
    assert gateway.node.view.schemas.incompatibilities(h2) == {
        "job": "message field 'b': required on node h2, absent on this node"
    }
