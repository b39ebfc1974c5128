"""The in-memory membership store: a table of records with expiry, and the watches that follow it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi_catga.transports._shared import WatchQueue
from fastapi_catga.transports.base import MemberEvent

__all__ = ["MemberTable", "MemoryMembers"]


class _Watch(WatchQueue):
    def __init__(self, table: MemberTable, namespace: str) -> None:
        super().__init__()
        self.table = table
        self.namespace = namespace

    async def stop(self) -> None:
        self.table.watches.pop(self, None)
        self.end()


class MemberTable:
    """The records of every cluster on one `InMemoryBroker`, by (cluster, node id), with expiry."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self._records: dict[tuple[str, str], tuple[bytes, float]] = {}
        # A dict, not a set: watches are told in the order they came (a seeded simulation replays).
        self.watches: dict[_Watch, None] = {}

    def put(self, namespace: str, node_id: str, value: bytes, ttl: float) -> None:
        self._records[(namespace, node_id)] = (value, self.clock() + ttl)
        self._notify(namespace, MemberEvent("put", node_id, value))

    def create(self, namespace: str, node_id: str, value: bytes, ttl: float, replacing: bytes | None) -> bool:
        held = self._records.get((namespace, node_id))
        if held is not None and held[1] > self.clock() and held[0] != replacing:
            return False
        self.put(namespace, node_id, value, ttl)
        return True

    def delete(self, namespace: str, node_id: str) -> None:
        if self._records.pop((namespace, node_id), None) is not None:
            self._notify(namespace, MemberEvent("delete", node_id))

    def list(self, namespace: str) -> dict[str, bytes]:
        now = self.clock()
        return {
            node: value
            for (ns, node), (value, expires) in self._records.items()
            if ns == namespace and expires > now
        }

    def watch(self, namespace: str) -> _Watch:
        watch = _Watch(self, namespace)
        self.watches[watch] = None
        return watch

    def end_watches(self) -> None:
        """The broker went down: every watch ends (records stay)."""
        for watch in list(self.watches):
            watch.end()
        self.watches.clear()

    def _notify(self, namespace: str, event: MemberEvent) -> None:
        for watch in self.watches:
            if watch.namespace == namespace:
                watch.put(event)


class MemoryMembers:
    """One transport's `MembershipStore` on the broker's table, namespaced by cluster.

    Args:
        table: the broker's records.
        cluster: the namespace.
        reachable: waits while the broker is frozen, raises `TransportError` while it is down.
    """

    def __init__(self, table: MemberTable, cluster: str, reachable: Callable[[], Awaitable[None]]) -> None:
        self._table = table
        self._cluster = cluster
        self._reachable = reachable

    async def prepare(self, ttl: float) -> None:
        await self._reachable()

    async def put(self, node_id: str, value: bytes, ttl: float) -> None:
        await self._reachable()
        self._table.put(self._cluster, node_id, value, ttl)

    async def create(self, node_id: str, value: bytes, ttl: float, *, replacing: bytes | None = None) -> bool:
        await self._reachable()
        return self._table.create(self._cluster, node_id, value, ttl, replacing)

    async def delete(self, node_id: str) -> None:
        await self._reachable()
        self._table.delete(self._cluster, node_id)

    async def list(self) -> dict[str, bytes]:
        await self._reachable()
        return self._table.list(self._cluster)

    async def watch(self) -> _Watch:
        await self._reachable()
        return self._table.watch(self._cluster)
