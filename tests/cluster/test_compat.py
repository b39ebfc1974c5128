"""`SchemaCheck` and the view: which peers a type may go to, judged on their records alone."""

from __future__ import annotations

import logging
from typing import ClassVar

import pytest

from fastapi_catga import Command, IncompatibleSchemaError, NodeInfo
from fastapi_catga.cluster.compat import SchemaCheck
from fastapi_catga.cluster.view import ClusterView
from fastapi_catga.core.schemas import advertised


class PayV1(Command[str]):
    type_name: ClassVar[str] = "pay"
    amount: int


class PayV2(Command[str]):
    type_name: ClassVar[str] = "pay"
    amount: int
    currency: str


class PayV2Noted(Command[str]):  # PayV2 and an optional field: another schema, compatible with it
    type_name: ClassVar[str] = "pay"
    amount: int
    currency: str
    note: str = ""


def peer(node_id: str, schemas: dict[str, str] | None, app_version: str = "") -> NodeInfo:
    return NodeInfo(node_id=node_id, handles=["pay"], schemas=schemas or {}, app_version=app_version)


def view_with(*peers: NodeInfo) -> ClusterView:
    me = NodeInfo(node_id="me", handles=["pay"], schemas=advertised([PayV1]))
    view = ClusterView(me, ttl=10, schemas=SchemaCheck([PayV1]))
    for number, info in enumerate(peers):
        view.observe(info, now=float(number))
    return view


def test_capable_leaves_out_incompatible_peers_only() -> None:
    view = view_with(
        peer("same", advertised([PayV1])),
        peer("newer", advertised([PayV2]), "2.0"),
        peer("older-catga", None),  # no schemas in its record: nothing says it is incompatible
        peer("garbled", {"pay": "not a schema"}),  # unreadable here: the far side judges
    )
    assert [n.node_id for n in view.capable("pay")] == ["me", "garbled", "older-catga", "same"]
    assert view.incompatible("pay") is None  # compatible peers are left
    refused = view.incompatible("pay", "newer")
    assert isinstance(refused, IncompatibleSchemaError)
    assert refused.details == {
        "newer": ["message field 'currency': required on node newer, absent on this node"]
    }
    assert "newer (app 2.0): message field 'currency'" in str(refused)


def test_a_sent_class_is_learned_and_compared() -> None:
    me = NodeInfo(node_id="me")
    view = ClusterView(me, ttl=10)  # handles nothing: knows no schema until it sends
    view.observe(peer("newer", advertised([PayV2])), now=0.0)
    assert [n.node_id for n in view.capable("pay")] == ["newer"]
    view.learn(PayV1)
    assert view.capable("pay") == []
    assert isinstance(view.incompatible("pay"), IncompatibleSchemaError)
    view.learn(PayV2)
    assert [n.node_id for n in view.capable("pay")] == ["newer"]


def test_each_peer_and_type_is_logged_once_until_it_leaves(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fastapi_catga.cluster.compat")
    newer = peer("newer", advertised([PayV2]))
    view = view_with(newer)
    for now in range(5):
        view.observe(newer.model_copy(update={"last_seen": newer.last_seen.replace(year=2100 + now)}), now)
        view.capable("pay")
        view.schemas.incompatibilities(newer)
    assert len(caplog.records) == 1
    view.remove("newer")
    view.observe(newer, now=10.0)
    assert len(caplog.records) == 2


def test_each_peer_is_named_in_its_own_reasons(caplog: pytest.LogCaptureFixture) -> None:
    # Peers running the same schema share one cached comparison, but not each other's names.
    caplog.set_level(logging.WARNING, logger="fastapi_catga.cluster.compat")
    b, c = peer("b", advertised([PayV2])), peer("c", advertised([PayV2]), "2.0")
    view = view_with(b, c)
    reason = "message field 'currency': required on node {}, absent on this node"
    assert view.schemas.incompatibilities(c) == {"pay": reason.format("c")}
    assert view.schemas.incompatibilities(b) == {"pay": reason.format("b")}
    refused = view.incompatible("pay")
    assert isinstance(refused, IncompatibleSchemaError)
    assert refused.details == {"b": [reason.format("b")], "c": [reason.format("c")]}
    assert f"c (app 2.0): {reason.format('c')}" in str(refused)
    logged = sorted(r.getMessage() for r in caplog.records)
    assert [m.split(" has ")[0] for m in logged] == ["node b", "node c (app 2.0)"]  # once each
    assert logged[0].endswith(reason.format("b"))
    assert logged[1].endswith(reason.format("c"))


def test_a_class_learned_later_is_judged_by_its_own_schema(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="fastapi_catga.cluster.compat")
    view = view_with(peer("newer", advertised([PayV2])))
    assert view.capable("pay") == [view.self_info]  # PayV1 here: it lacks the required currency
    view.learn(PayV2Noted)  # sent under the same type name: compatible with PayV2
    assert [n.node_id for n in view.capable("pay")] == ["me", "newer"]
    assert view.incompatible("pay", "newer") is None
    view.learn(PayV1)
    assert view.incompatible("pay", "newer") is not None
    assert len(caplog.records) == 1  # the same pair of schemas again: already said


def test_a_field_name_cannot_pass_for_the_peer_name() -> None:
    # The cached reasons mark the peer with a NUL; a field name is shown by repr, NUL escaped.
    fingerprint, fields, result = advertised([PayV1])["pay"].split("|")
    odd = peer("odd", {"pay": f"0{fingerprint[1:]}|{fields},a%00b:abcdef|{result}"})
    assert view_with(odd).schemas.incompatibilities(odd) == {
        "pay": r"message field 'a\x00b': required on node odd, absent on this node"
    }
