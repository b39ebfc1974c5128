"""`ClusterView`: who is alive, judged on explicit ``now`` values (no clock, no event loop)."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi_catga import NodeInfo
from fastapi_catga.cluster.view import ClusterView
from tests.virtual_time import EPOCH

TTL = 10.0


def record(
    node_id: str, written: float, handles: tuple[str, ...] = ("Work",), events: tuple[str, ...] = ()
) -> NodeInfo:
    """A node's record as its heartbeat at ``written`` (seconds after EPOCH, on its own clock) wrote it."""
    return NodeInfo(
        node_id=node_id,
        last_seen=datetime.fromtimestamp(EPOCH + written, UTC),
        handles=list(handles),
        events=list(events),
    )


class Changes:
    """An ``on_change`` callback that counts its calls."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def make_view(changes: Changes | None = None, handles: tuple[str, ...] = ("Work",)) -> ClusterView:
    return ClusterView(record("self", 0, handles), TTL, on_change=changes or Changes())


def ids(nodes: list[NodeInfo]) -> list[str]:
    return [node.node_id for node in nodes]


# -- joining and leaving -------------------------------------------------------------------------------


def test_a_new_view_holds_only_this_node() -> None:
    view = make_view()
    assert ids(view.nodes()) == ["self"]
    assert view.node_id == "self"
    assert view.get("self") is view.self_info
    assert view.get("other") is None
    assert not view.stale


def test_observing_a_record_adds_the_member_and_tells_on_change() -> None:
    changes = Changes()
    view = make_view(changes)
    b = record("b", 1)
    view.observe(b, now=100)
    assert ids(view.nodes()) == ["self", "b"]
    assert view.get("b") is b
    assert changes.count == 1


def test_its_own_record_never_enters_the_members() -> None:
    changes = Changes()
    view = make_view(changes)
    view.observe(record("self", 5, handles=("Other",)), now=100)
    assert ids(view.nodes()) == ["self"]
    assert view.self_info.handles == ["Work"]
    assert changes.count == 0


def test_nodes_lists_this_node_first_then_by_id_and_returns_a_copy() -> None:
    view = ClusterView(record("m", 0), TTL)
    for node_id in ("c", "a", "z", "b"):
        view.observe(record(node_id, 1), now=100)
    assert ids(view.nodes()) == ["m", "a", "b", "c", "z"]
    view.nodes().clear()
    assert ids(view.nodes()) == ["m", "a", "b", "c", "z"]


def test_remove_drops_a_member_once() -> None:
    changes = Changes()
    view = make_view(changes)
    view.observe(record("b", 1), now=100)
    assert view.remove("b") is True
    assert ids(view.nodes()) == ["self"]
    assert view.get("b") is None
    assert changes.count == 2
    assert view.remove("b") is False
    assert changes.count == 2


# -- heartbeats ----------------------------------------------------------------------------------------


def test_a_record_that_is_not_newer_is_no_sign_of_life() -> None:
    changes = Changes()
    view = make_view(changes)
    first = record("b", 5)
    view.observe(first, now=100)
    view.observe(record("b", 5), now=105)  # a watch replaying the current value
    view.observe(record("b", 4, handles=("Old",)), now=106)  # an older record, arriving late
    assert view.get("b") is first
    assert changes.count == 1
    # Still judged from the first observation: silent since 100, so dead after 100 + TTL.
    assert view.sweep(now=100 + TTL + 0.001) == ["b"]


def test_a_newer_heartbeat_restarts_the_ttl() -> None:
    view = make_view()
    view.observe(record("b", 5), now=100)
    view.observe(record("b", 6), now=108)
    assert view.sweep(now=100 + TTL + 1) == []
    assert view.sweep(now=108 + TTL + 0.001) == ["b"]


def test_on_change_is_told_only_when_what_a_member_handles_changes() -> None:
    changes = Changes()
    view = make_view(changes)
    view.observe(record("b", 1, handles=("Work",)), now=100)
    view.observe(record("b", 2, handles=("Work",)), now=101)
    assert changes.count == 1
    view.observe(record("b", 3, handles=("Work", "More")), now=102)
    assert changes.count == 2
    changed = view.get("b")
    assert changed is not None and changed.handles == ["Work", "More"]
    view.observe(record("b", 4, handles=("Work", "More"), events=("Happened",)), now=103)
    assert changes.count == 3


# -- sweeping ------------------------------------------------------------------------------------------


def test_sweep_evicts_only_members_silent_for_longer_than_the_ttl() -> None:
    changes = Changes()
    view = make_view(changes)
    view.observe(record("b", 1), now=100)
    view.observe(record("c", 1), now=103)
    assert view.sweep(now=100 + TTL) == []  # exactly the TTL: not yet
    assert changes.count == 2
    assert view.sweep(now=100 + TTL + 0.001) == ["b"]
    assert ids(view.nodes()) == ["self", "c"]
    assert changes.count == 3
    assert view.sweep(now=103 + TTL) == []
    assert changes.count == 3  # a sweep that evicts nobody changes nothing
    assert view.sweep(now=103 + TTL + 0.001) == ["c"]


def test_a_stale_view_evicts_nobody() -> None:
    view = make_view()
    view.observe(record("b", 1), now=100)
    view.stale = True
    assert view.sweep(now=100 + 50 * TTL) == []
    assert ids(view.nodes()) == ["self", "b"]
    view.stale = False
    assert view.sweep(now=100 + 50 * TTL) == ["b"]


def test_with_proven_at_a_silence_counts_only_once_the_store_carried_heartbeats_past_it() -> None:
    view = make_view()
    view.observe(record("b", 1), now=100)
    late = 100 + TTL + 0.001
    # The store was last proven to work no more than ``margin`` after b was heard: b's silence
    # may be the store's own.
    assert view.sweep(late, proven_at=99, margin=1) == []
    assert view.sweep(late, proven_at=101, margin=1) == []
    assert view.sweep(100 + TTL, proven_at=102, margin=1) == []  # proven, but not silent for a TTL yet
    assert ids(view.nodes()) == ["self", "b"]
    assert view.sweep(late, proven_at=101.001, margin=1) == ["b"]


def test_refresh_all_gives_every_member_a_full_ttl_from_now() -> None:
    view = make_view()
    view.observe(record("b", 1), now=100)
    view.observe(record("c", 1), now=105)
    view.refresh_all(now=200)
    assert view.sweep(now=200 + TTL) == []
    assert sorted(view.sweep(now=200 + TTL + 0.001)) == ["b", "c"]


def test_refresh_all_does_not_make_an_old_record_new() -> None:
    view = make_view()
    view.observe(record("b", 5), now=100)
    view.refresh_all(now=200)
    view.observe(record("b", 5), now=205)  # the resync's listing: the same record again
    assert view.sweep(now=200 + TTL + 0.001) == ["b"]


# -- suspects and capable nodes ------------------------------------------------------------------------


def test_a_suspect_stays_suspect_until_its_next_heartbeat() -> None:
    changes = Changes()
    view = make_view(changes)
    view.observe(record("b", 1), now=100)
    assert not view.is_suspect("b")
    view.suspect("b", now=101)
    assert view.is_suspect("b")
    assert changes.count == 1  # suspicion reorders routing but is not a membership change
    view.observe(record("b", 1), now=102)  # not newer: still suspect
    assert view.is_suspect("b")
    view.observe(record("b", 2), now=103)
    assert not view.is_suspect("b")


def test_suspecting_an_unknown_node_or_this_one_does_nothing() -> None:
    view = make_view()
    view.suspect("ghost", now=1)
    view.suspect("self", now=1)
    assert not view.is_suspect("ghost")
    assert not view.is_suspect("self")
    assert ids(view.nodes()) == ["self"]


def test_capable_lists_nodes_with_the_handler_suspects_last() -> None:
    view = make_view(handles=("Work",))
    view.observe(record("a", 1, handles=("Work",)), now=100)
    view.observe(record("b", 1, handles=("Work", "Other")), now=100)
    view.observe(record("c", 1, handles=("Other",), events=("Happened",)), now=100)
    assert ids(view.capable("Work")) == ["self", "a", "b"]
    assert ids(view.capable("Other")) == ["b", "c"]
    assert ids(view.capable("Happened")) == []
    assert ids(view.capable("Happened", events=True)) == ["c"]
    assert ids(view.capable("Nobody")) == []
    view.suspect("a", now=101)
    assert ids(view.capable("Work")) == ["self", "b", "a"]


def test_capable_answers_follow_every_change_of_the_view() -> None:
    view = make_view(handles=())
    assert ids(view.capable("Work")) == []
    view.observe(record("b", 1), now=100)
    assert ids(view.capable("Work")) == ["b"]
    view.observe(record("a", 1), now=101)
    assert ids(view.capable("Work")) == ["a", "b"]
    view.suspect("a", now=102)
    assert ids(view.capable("Work")) == ["b", "a"]
    view.observe(record("a", 2), now=103)  # its heartbeat clears the suspicion
    assert ids(view.capable("Work")) == ["a", "b"]
    view.observe(record("a", 3, handles=("Other",)), now=104)
    assert ids(view.capable("Work")) == ["b"]
    assert ids(view.capable("Other")) == ["a"]
    view.remove("b")
    assert ids(view.capable("Work")) == []
    assert view.sweep(now=104 + TTL + 0.001) == ["a"]
    assert ids(view.capable("Other")) == []
