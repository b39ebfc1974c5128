"""``catga watch``: the members, then one line per join, leave, heartbeat or change as it happens.

The watch starts before the first list, so nothing between the two is missed. Not every broker
announces a record that expired (Redis does not; NATS does from 2.11), so the store is also read
again every few seconds: a member missing from it, unseen since the read began, has left.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi_catga.cli.commands import Context, connected, emit, parse_records, within
from fastapi_catga.cli.exits import OK, UNREACHABLE, Exit
from fastapi_catga.cli.render import NODE_COLUMNS, dumps, node_rows, table
from fastapi_catga.cluster.identity import read_record
from fastapi_catga.core.nodes import NodeInfo
from fastapi_catga.exceptions import TransportError
from fastapi_catga.transports.base import MemberEvent, MembershipStore, MemberWatch

__all__ = ["Watcher", "watch"]

logger = logging.getLogger(__name__)

RELIST = 2.0  # s between reads of the whole store (records that expired unannounced)


@dataclass(slots=True)
class _Seen:
    info: NodeInfo
    at: float  # monotonic time its latest record was seen


class Watcher:
    """Turns records and deletes into one report per change (``emit`` gets each line)."""

    def __init__(self, as_json: bool, emit: Callable[[str], None] = emit) -> None:
        self.known: dict[str, _Seen] = {}
        self._as_json = as_json
        self._emit = emit

    def present(self, nodes: list[NodeInfo], now: float) -> None:
        """The members when the watch began."""
        for info in nodes:
            self.known[info.node_id] = _Seen(info, now)
            if self._as_json:
                self._report("present", info)

    def put(self, info: NodeInfo, now: float) -> None:
        old = self.known.get(info.node_id)
        if old is not None and info.last_seen < old.info.last_seen:
            return  # an older record than the one shown (a list that began before the watch's event)
        self.known[info.node_id] = _Seen(info, now)
        if old is None:
            self._report("join", info, f"{info.endpoint or '-'}  handles {','.join(info.handles) or '-'}")
        elif old.info.incarnation != info.incarnation:
            self._report("restart", info, "a new process with this node id")
        elif old.info != info.model_copy(update={"last_seen": old.info.last_seen}):
            self._report("update", info, f"handles {','.join(info.handles) or '-'}")
        elif info.last_seen != old.info.last_seen:
            gap = (info.last_seen - old.info.last_seen).total_seconds()
            self._report("heartbeat", info, f"+{gap:.1f}s")

    def delete(self, node_id: str, reason: str = "record removed") -> None:
        old = self.known.pop(node_id, None)
        if old is not None:
            self._report("leave", old.info, reason)

    def resync(self, nodes: list[NodeInfo], read_at: float) -> None:
        """A full read of the store, begun at ``read_at``: members missing from it have left."""
        for info in nodes:
            self.put(info, read_at)
        listed = {info.node_id for info in nodes}
        for node_id, seen in list(self.known.items()):
            if node_id not in listed and seen.at < read_at:
                self.delete(node_id, "record expired")

    def _report(self, kind: str, info: NodeInfo, detail: str = "") -> None:
        now = datetime.now(UTC)
        if self._as_json:
            line: dict[str, Any] = {
                "event": kind,
                "at": f"{now:%Y-%m-%dT%H:%M:%S.%f}Z",
                "node_id": info.node_id,
            }
            if kind == "leave":
                line["reason"] = detail
            line["node"] = info.model_dump(mode="json")
            self._emit(dumps(line, indent=None))
        else:
            self._emit(f"{now:%H:%M:%S}Z  {kind:<9}  {info.node_id}  {detail}".rstrip())


async def _pump(member_watch: MemberWatch, events: asyncio.Queue[MemberEvent | None]) -> None:
    """The watch's events into a queue (None: it ended), so waiting on them can time out safely."""
    try:
        async for event in member_watch:
            events.put_nowait(event)
    except TransportError as exc:
        logger.info("the membership watch ended: %s", exc)
    finally:
        events.put_nowait(None)


def _apply(watcher: Watcher, event: MemberEvent, now: float) -> None:
    if event.kind == "delete":
        watcher.delete(event.node_id)
        return
    try:
        watcher.put(read_record(event.node_id, event.value), now)
    except ValueError as exc:
        logger.warning("ignoring the membership record under %r: %s", event.node_id[:80], exc)


async def _follow(
    ctx: Context,
    store: MembershipStore,
    watcher: Watcher,
    events: asyncio.Queue[MemberEvent | None],
    until: float,
    clock: Callable[[], float],
) -> None:
    next_read = clock() + RELIST
    while (now := clock()) < until:
        try:
            event = await asyncio.wait_for(events.get(), timeout=min(next_read, until) - now)
        except TimeoutError:
            if clock() >= next_read:
                read_at = clock()
                watcher.resync(parse_records(await within(ctx, store.list(), "listing the members")), read_at)
                next_read = clock() + RELIST
            continue
        if event is None:
            raise Exit(UNREACHABLE, f"lost the connection to the broker ({ctx.url}); the watch ended")
        _apply(watcher, event, clock())


async def watch(ctx: Context, duration: float | None, clock: Callable[[], float] = time.monotonic) -> int:
    """``catga watch``: until Ctrl-C, or for ``duration`` seconds."""
    until = math.inf if duration is None else clock() + duration
    async with connected(ctx) as transport:
        store = transport.members
        await within(ctx, store.prepare(ctx.settings.node_ttl), "preparing the membership store")
        member_watch = await within(ctx, store.watch(), "watching the members")
        events: asyncio.Queue[MemberEvent | None] = asyncio.Queue()
        pump = asyncio.create_task(_pump(member_watch, events), name="catga-cli-watch")
        try:
            read_at = clock()
            found = parse_records(await within(ctx, store.list(), "listing the members"))
            if not ctx.as_json:
                emit(table(NODE_COLUMNS, node_rows(found, datetime.now(UTC))) if found else "no live nodes")
                emit(f"-- watching {ctx.where}; Ctrl-C to stop")
            watcher = Watcher(ctx.as_json)
            watcher.present(found, read_at)
            await _follow(ctx, store, watcher, events, until, clock)
        finally:
            pump.cancel()
            await member_watch.stop()
    return OK
