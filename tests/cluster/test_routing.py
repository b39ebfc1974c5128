"""Routing strategies pick among capable nodes; routing keys stick to one node while it lives."""

from __future__ import annotations

import hashlib
from collections import Counter

from fastapi_catga import NodeInfo
from fastapi_catga.cluster.routing import ConsistentHash, LocalFirst, by_key, choose_node, strategy_named
from tests.cluster.conftest import StartNode
from tests.cluster.workload import Sticky, Work
from tests.polling import eventually

NODES = [NodeInfo(node_id=name) for name in ("a", "b", "c")]


def test_round_robin_takes_each_node_in_turn() -> None:
    strategy = strategy_named("round_robin")
    picks = [strategy.choose(NODES, Work(), "a").node_id for _ in range(6)]
    assert Counter(picks) == {"a": 2, "b": 2, "c": 2}


def test_random_picks_only_candidates_and_all_of_them_eventually() -> None:
    strategy = strategy_named("random")
    assert {strategy.choose(NODES, Work(), "a").node_id for _ in range(200)} == {"a", "b", "c"}


def test_local_first_prefers_this_node_and_spreads_otherwise() -> None:
    strategy = LocalFirst()
    assert {strategy.choose(NODES, Work(), "b").node_id for _ in range(10)} == {"b"}
    assert {strategy.choose(NODES[1:], Work(), "a").node_id for _ in range(10)} == {"b", "c"}


def test_a_routing_key_always_hashes_and_only_a_leaving_nodes_keys_move() -> None:
    keys = [f"customer-{i}" for i in range(300)]
    before = {
        key: choose_node(strategy_named("round_robin"), NODES, Sticky(key=key), "a").node_id for key in keys
    }
    assert set(before.values()) == {"a", "b", "c"}
    again = {key: choose_node(strategy_named("random"), NODES, Sticky(key=key), "a").node_id for key in keys}
    assert again == before  # the strategy does not matter when a key is declared
    after = {key: ConsistentHash().choose(NODES[:2], Sticky(key=key), "a").node_id for key in keys}
    moved = [key for key in keys if before[key] != after[key]]
    assert moved and all(before[key] == "c" for key in moved)


def test_rendezvous_weights_are_blake2b_of_key_nul_node_id() -> None:
    """The wire-visible rule nodes of every version agree on: the same key, the same node."""

    def weight(key: str, node_id: str) -> bytes:
        return hashlib.blake2b(f"{key}\x00{node_id}".encode(), digest_size=8).digest()

    for key in ("order-1", "ünïcode-kéy", "x" * 300, "7"):
        expected = max(NODES, key=lambda node: weight(key, node.node_id))
        assert by_key(NODES, key) is expected
        assert by_key(NODES[:1], key) is NODES[0]


async def test_local_first_runs_every_send_here_when_this_node_can(start_node: StartNode) -> None:
    a = await start_node("a", routing="local_first")
    await start_node("b")
    await eventually(lambda: len(a.node.nodes()) == 2, within=1)
    assert {await a.mediator.send(Work()) for _ in range(10)} == {"a"}
