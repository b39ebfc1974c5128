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
        key = message.routing_key() or message.message_id
        return max(candidates, key=lambda node: _weight(key, node.node_id))


def _weight(key: str, node_id: str) -> bytes:
    return hashlib.blake2b(f"{key}\x00{node_id}".encode(), digest_size=8).digest()


def strategy_named(name: RoutingName) -> RoutingStrategy:
    """The strategy for a ``CATGA_ROUTING`` value."""
    strategies: dict[str, type[RoutingStrategy]] = {
        "round_robin": RoundRobin,
        "random": RandomChoice,
        "local_first": LocalFirst,
    }
    return strategies[name]()


_consistent = ConsistentHash()


def choose_node(
    strategy: RoutingStrategy, candidates: Sequence[NodeInfo], message: Message, local_id: str
) -> NodeInfo:
    """Route ``message``: by its routing key when it declares one, else by ``strategy``."""
    if message.routing_key() is not None:
        return _consistent.choose(candidates, message, local_id)
    return strategy.choose(candidates, message, local_id)
