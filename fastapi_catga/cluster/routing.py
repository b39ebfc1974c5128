"""Routing: which capable node takes a command or query.

Messages that declare a ``routing_key()`` always go by rendezvous (highest-random-weight)
hashing: the same key goes to the same node while that node lives, and only the keys of a node
that leaves move. Others follow the configured strategy.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Sequence
from typing import Literal, Protocol

from fastapi_catga.core.messages import Message
from fastapi_catga.core.nodes import NodeInfo

__all__ = [
    "ConsistentHash",
    "LocalFirst",
    "RandomChoice",
    "RoundRobin",
    "RoutingName",
    "RoutingStrategy",
    "by_key",
    "choose_node",
    "strategy_named",
]

RoutingName = Literal["round_robin", "random", "local_first"]


class RoutingStrategy(Protocol):
    """Picks one of the candidates (never empty) for a message."""

    def choose(self, candidates: Sequence[NodeInfo], message: Message, local_id: str) -> NodeInfo: ...


class RoundRobin:
    """Each node in turn (the default): load spreads evenly over the capable nodes."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, candidates: Sequence[NodeInfo], message: Message, local_id: str) -> NodeInfo:
        return candidates[next(self._counter) % len(candidates)]


class RandomChoice:
    """A random capable node."""

    def choose(self, candidates: Sequence[NodeInfo], message: Message, local_id: str) -> NodeInfo:
        return random.choice(candidates)


class LocalFirst:
    """This node when it can handle the message, else round robin over the others."""

    def __init__(self) -> None:
        self._fallback = RoundRobin()

    def choose(self, candidates: Sequence[NodeInfo], message: Message, local_id: str) -> NodeInfo:
        for node in candidates:
            if node.node_id == local_id:
                return node
        return self._fallback.choose(candidates, message, local_id)


class ConsistentHash:
    """Rendezvous hashing on the message's routing key (same key, same node while it lives)."""

    def choose(self, candidates: Sequence[NodeInfo], message: Message, local_id: str) -> NodeInfo:
        return by_key(candidates, message.routing_key() or message.message_id)


def by_key(candidates: Sequence[NodeInfo], key: str) -> NodeInfo:
    """The candidate with the highest weight for ``key``: blake2b-64 of ``key NUL node_id``.

    The key is hashed once; each node's weight continues from a copy of that state (what hashing
    the whole string would give, for a copy and a short update instead of a new hash each).
    """
    if len(candidates) == 1:
        return candidates[0]
    keyed = hashlib.blake2b(key.encode() + b"\x00", digest_size=8)

    def weight(node: NodeInfo) -> bytes:
        state = keyed.copy()
        state.update(node.node_id.encode())
        return state.digest()

    return max(candidates, key=weight)


def strategy_named(name: RoutingName) -> RoutingStrategy:
    """The strategy for a ``CATGA_ROUTING`` value."""
    strategies: dict[str, type[RoutingStrategy]] = {
        "round_robin": RoundRobin,
        "random": RandomChoice,
        "local_first": LocalFirst,
    }
    return strategies[name]()


def choose_node(
    strategy: RoutingStrategy, candidates: Sequence[NodeInfo], message: Message, local_id: str
) -> NodeInfo:
    """Route ``message``: by its routing key when it declares one, else by ``strategy``."""
    key = message.routing_key()
    if key is not None:
        return by_key(candidates, key or message.message_id)  # as ConsistentHash: "" is no key
    return strategy.choose(candidates, message, local_id)
