"""Node identity: one live process per node id.

A fixed ``CATGA_NODE_ID`` (a StatefulSet's pod name) is allowed, and a restarted process takes its
id back; two live processes with one id are not: they would share one record, both run every
request sent to that id, and each drop the other's events as its own. Each start gets a fresh
``incarnation``; a process that finds its id in the store under another one waits to see whether
that record is still refreshed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from pydantic import ValidationError

from fastapi_catga.core.nodes import NodeInfo
from fastapi_catga.exceptions import ConfigurationError
from fastapi_catga.transports.base import MembershipStore

__all__ = ["claim_node_id", "read_record"]

logger = logging.getLogger(__name__)


async def claim_node_id(
    store: MembershipStore, me: NodeInfo, *, ttl: float, poll: float, clock: Callable[[], float]
) -> None:
    """Return once ``me.node_id`` is this process's: its record written where none was held (an
    atomic create, so of two processes starting at once only one gets it), or an earlier process's
    record that nobody refreshed for ``ttl`` taken over.

    Raises:
        ConfigurationError: another incarnation holds the record and refreshes it: it is alive.
    """
    record = me.model_dump_json().encode()
    held = (await store.list()).get(me.node_id)
    if held is not None and _incarnation(held) == me.incarnation:
        return
    if held is None:
        if await store.create(me.node_id, record, ttl):
            return
        held = (await store.list()).get(me.node_id)  # another process took it just now
        if held is None:
            raise _taken(me.node_id)
    logger.warning(
        "node id %s is in the membership store from an earlier process; waiting up to %.1f s to see "
        "whether it is still alive",
        me.node_id,
        ttl,
    )
    since = clock()
    while clock() - since <= ttl:
        await asyncio.sleep(poll)
        current = (await store.list()).get(me.node_id)
        if current is None:  # it expired: that process is gone
            if await store.create(me.node_id, record, ttl):
                break
            raise _taken(me.node_id)
        if current != held:
            raise _taken(me.node_id)
    else:  # listed, but stale (a server without per-key TTLs): replace it unless another did first
        if not await store.create(me.node_id, record, ttl, replacing=held):
            raise _taken(me.node_id)
    logger.info("node id %s was free (its old record is gone or went stale): taking it", me.node_id)


def _taken(node_id: str) -> ConfigurationError:
    return ConfigurationError(
        f"node id {node_id!r} belongs to a live node (its record is still refreshed, or another "
        "process took it as this one started); give this process another CATGA_NODE_ID, or stop "
        "the other one first"
    )


def _incarnation(record: bytes) -> str | None:
    try:
        return read_record(None, record).incarnation
    except ValueError:
        return None


def read_record(key: str | None, value: bytes | None) -> NodeInfo:
    """The `NodeInfo` a membership record holds under ``key``.

    Raises:
        ValueError: it is no NodeInfo JSON, or it names another node than its key (a record that
            could make one node answer for another).
    """
    try:
        info = NodeInfo.model_validate_json(value or b"")
    except ValidationError as exc:
        raise ValueError(f"not a node record ({exc.error_count()} error(s))") from None
    if key is not None and info.node_id != key:
        raise ValueError(f"it names node {info.node_id[:80]!r}")
    return info
