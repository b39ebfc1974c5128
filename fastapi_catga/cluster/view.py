"""The local view of the cluster: who is alive, judged on this node's monotonic clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi_catga.cluster.compat import SchemaCheck
from fastapi_catga.core.messages import Message
from fastapi_catga.core.nodes import NodeInfo
from fastapi_catga.exceptions import IncompatibleSchemaError

__all__ = ["ClusterView", "Member"]


@dataclass(slots=True)
class Member:
    """A node in the view, with when this node last heard of it (monotonic seconds)."""

    info: NodeInfo
    observed: float
    suspect_since: float | None = None


class ClusterView:
    """Live members, this node included.

    Liveness is when each member's record was last *observed* here, on the local monotonic clock,
    so clock skew between machines does not matter. While the broker is unreachable the view is
    ``stale``: frozen, no evictions (the outage says nothing about the members).

    Args:
        self_info: this node, always in the view.
        ttl: seconds without a heartbeat after which a member is dead.
        on_change: called after a member joins, leaves or changes what it handles.
        schemas: this node's message schemas, to leave out peers that run incompatible ones.
    """

    def __init__(
        self,
        self_info: NodeInfo,
        ttl: float,
        on_change: Callable[[], None] = lambda: None,
        schemas: SchemaCheck | None = None,
    ) -> None:
        self.self_info = self_info
        self.schemas = schemas or SchemaCheck()
        self.ttl = ttl
        self.stale = False
        self._on_change = on_change
        self._members: dict[str, Member] = {}
        # Read on every send, changed a few times per heartbeat interval: computed on demand.
        self._nodes: list[NodeInfo] | None = None
        #: Capable nodes by type name: [False] for requests, [True] for events.
        self._capable: tuple[dict[str, list[NodeInfo]], dict[str, list[NodeInfo]]] = ({}, {})

    def _touch(self) -> None:
        self._nodes = None
        self._forget_routes()

    @property
    def node_id(self) -> str:
        return self.self_info.node_id

    def nodes(self) -> list[NodeInfo]:
        """Every live node, this one first, then by id."""
        if self._nodes is None:
            others = sorted(self._members.values(), key=lambda m: m.info.node_id)
            self._nodes = [self.self_info, *(m.info for m in others)]
        return list(self._nodes)

    def get(self, node_id: str) -> NodeInfo | None:
        """A live node by id, or None."""
        if node_id == self.node_id:
            return self.self_info
        member = self._members.get(node_id)
        return member.info if member else None

    def observe(self, info: NodeInfo, now: float) -> None:
        """A member's record was seen (join or heartbeat); a new heartbeat clears any suspicion.

        A record seen again without a newer ``last_seen`` (a watch replaying current values, a
        resync listing the store) is no new sign of life: the member keeps its observation time.
        ``last_seen`` is compared only with the same member's earlier records, written by the
        same clock, so skew between machines plays no part.
        """
        if info.node_id == self.node_id:
            return
        known = self._members.get(info.node_id)
        if known is not None and info.last_seen <= known.info.last_seen:
            return
        self._members[info.node_id] = Member(info, now)
        self._touch()
        if known is None or _routes(known.info) != _routes(info):
            self.schemas.incompatibilities(info)  # each incompatible type is logged, once
            self._on_change()

    def remove(self, node_id: str) -> bool:
        """Drop a member (it left, or its record expired); True when it was there."""
        if self._members.pop(node_id, None) is None:
            return False
        self.schemas.forget(node_id)
        self._touch()
        self._on_change()
        return True

    def sweep(self, now: float, *, proven_at: float | None = None, margin: float = 0.0) -> list[str]:
        """Evict members silent for longer than the TTL; returns their ids. No-op while stale.

        With ``proven_at`` (when this node last saw its own heartbeat come back through the store),
        a member is evicted only if the store was proven to work more than ``margin`` seconds after
        that member was last heard: silence that began with the store's own is no sign of death.
        """
        if self.stale:
            return []
        dead = [
            node_id
            for node_id, m in self._members.items()
            if now - m.observed > self.ttl and (proven_at is None or proven_at > m.observed + margin)
        ]
        for node_id in dead:
            del self._members[node_id]
            self.schemas.forget(node_id)
        if dead:
            self._touch()
            self._on_change()
        return dead

    def refresh_all(self, now: float) -> None:
        """Treat every member as just seen: after an outage, give each a full TTL to show up."""
        for member in self._members.values():
            member.observed = now

    def suspect(self, node_id: str, now: float) -> None:
        """A request to this member failed; routing skips it until its next heartbeat."""
        member = self._members.get(node_id)
        if member is not None and member.suspect_since is None:
            member.suspect_since = now
            self._touch()

    def is_suspect(self, node_id: str) -> bool:
        member = self._members.get(node_id)
        return member is not None and member.suspect_since is not None

    def _forget_routes(self) -> None:
        for routes in self._capable:
            routes.clear()

    def capable(self, type_name: str, *, events: bool = False) -> list[NodeInfo]:
        """Live nodes with a handler for the type and a schema of it compatible with this node's,
        suspects last (do not modify the list)."""
        routes = self._capable[events]  # one dict per kind: no key tuple to build and hash per send
        nodes = routes.get(type_name)
        if nodes is None:
            nodes = [
                n
                for n in self.nodes()
                if type_name in (n.events if events else n.handles)
                and (n is self.self_info or not self.schemas.problems(n, type_name))
            ]
            routes[type_name] = nodes = sorted(nodes, key=lambda n: self.is_suspect(n.node_id))
        return nodes

    def learn(self, message_type: type[Message]) -> None:
        """Note the class of a message this node sends, so peers are checked against its schema;
        those that handle it are compared now, each incompatible one logged once (a durable type,
        which is not routed, is compared nowhere else)."""
        if self.schemas.learn(message_type):
            self._forget_routes()
            name = message_type.type_name
            for node in self.nodes()[1:]:
                if name in node.handles:
                    self.schemas.problems(node, name)

    def incompatible(self, type_name: str, node_id: str | None = None) -> IncompatibleSchemaError | None:
        """The error for a send of the type when every peer that handles it (or the one named) runs
        an incompatible schema of it; None when one does not."""
        peers = [n for n in self.nodes()[1:] if type_name in n.handles and node_id in (None, n.node_id)]
        return self.schemas.error(type_name, peers)


def _routes(info: NodeInfo) -> tuple[list[str], list[str], dict[str, str]]:
    return info.handles, info.events, info.schemas
