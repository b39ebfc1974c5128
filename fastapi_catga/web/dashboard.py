"""`catga_dashboard_router`: a live cluster page. Opt-in, and apart from `catga_router`, because it
shows every member's endpoint and metadata: mount it behind your own auth.

    app = FastAPI(lifespan=catga_lifespan(observers=[DashboardObserver()]))
    app.include_router(catga_dashboard_router)

| route | answer |
|---|---|
| ``GET /catga/dashboard`` | one HTML page (inline CSS and JS, works offline) |
| ``GET /catga/dashboard/events`` | Server-Sent Events: a JSON snapshot every ``interval`` seconds |

A snapshot holds the live nodes, this node's broker state and, with a `DashboardObserver`
installed, the messages handled and failed per type on this node, with their rates over the last
interval. Without one the types table is ``null`` (the page says how to get it): the observer is
installed explicitly, like `PrometheusObserver`, because any observer sends every in-process
request through the cluster's sender, and that cost should be a choice.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib.resources import files
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import HTMLResponse, StreamingResponse

from fastapi_catga.bootstrap import Catga
from fastapi_catga.core.messages import Message
from fastapi_catga.core.nodes import NodeInfo, utc_now
from fastapi_catga.core.observe import Observer
from fastapi_catga.web.dependencies import get_catga

__all__ = ["DashboardObserver", "catga_dashboard_router", "snapshot"]

catga_dashboard_router = APIRouter(prefix="/catga/dashboard", tags=["catga dashboard"])
CatgaDep = Annotated[Catga, Depends(get_catga)]


@dataclass(slots=True)
class TypeCounts:
    """Handler runs of one message type on this node."""

    handled: int = 0
    failed: int = 0


class DashboardObserver(Observer):
    """Counts handler runs on this node per message type, for the dashboard's types table.

    Install one per node: ``catga_lifespan(observers=[DashboardObserver()])``.
    """

    def __init__(self) -> None:
        self.counts: dict[str, TypeCounts] = {}

    def handle_ended(
        self, token: object, message: Message, seconds: float, error: BaseException | None
    ) -> None:
        counts = self.counts.setdefault(type(message).type_name, TypeCounts())
        counts.handled += 1
        if error is not None:
            counts.failed += 1


def _find_observer(catga: Catga) -> DashboardObserver | None:
    return next((o for o in catga.observers if isinstance(o, DashboardObserver)), None)


def _node_row(node: NodeInfo, now: datetime, incompatible: dict[str, str]) -> dict[str, Any]:
    return {
        "node_id": node.node_id,
        "endpoint": node.endpoint,
        "metadata": node.metadata,
        "handles": node.handles,
        "events": node.events,
        "version": node.version,
        "app_version": node.app_version,
        "incompatible": incompatible,
        "uptime": round((now - node.started_at).total_seconds(), 1),
        "heartbeat_age": round(max(0.0, (now - node.last_seen).total_seconds()), 1),
    }


def _type_rows(
    counts: Mapping[str, TypeCounts], previous: Mapping[str, tuple[int, int]], seconds: float
) -> list[dict[str, Any]]:
    rows = []
    for name in sorted(counts):
        now = counts[name]
        handled, failed = previous.get(name, (0, 0))
        rows.append(
            {
                "type": name,
                "handled": now.handled,
                "failed": now.failed,
                "handled_rate": round((now.handled - handled) / seconds, 2) if seconds > 0 else 0.0,
                "failed_rate": round((now.failed - failed) / seconds, 2) if seconds > 0 else 0.0,
            }
        )
    return rows


def snapshot(
    catga: Catga,
    previous: Mapping[str, tuple[int, int]] | None = None,
    seconds: float = 0.0,
    *,
    now: datetime | None = None,
) -> dict[str, Any]:
    """What the page shows: nodes, broker state and per-type counts.

    Rates are per second against ``previous`` (``type -> (handled, failed)``) taken ``seconds``
    ago; with ``seconds`` 0 (the first snapshot of a stream) they are 0.
    """
    node = catga.node
    at = now or utc_now()
    observer = _find_observer(catga)
    return {
        "node_id": node.node_id,
        "cluster": catga.settings.cluster,
        "at": at.isoformat(),
        "broker": {
            "transport": node.transport.name,
            "connected": node.transport.connected,
            "view_stale": node.view.stale,
        },
        "nodes": [_node_row(info, at, node.view.schemas.incompatibilities(info)) for info in node.nodes()],
        "types": None if observer is None else _type_rows(observer.counts, previous or {}, seconds),
    }


#: The longest a stream may be asked to stay open: a graceful shutdown waits for it, and this
#: keeps that wait well inside Kubernetes' default 30 s grace period.
MAX_STREAM_SECONDS = 15.0


async def snapshots(
    catga: Catga, interval: float, seconds: float, clock: Callable[[], float] = time.monotonic
) -> AsyncIterator[str]:
    """Server-Sent Events: a snapshot now and every ``interval`` seconds, for ``seconds`` at most.

    It also ends when the node stops. Starlette ends it when the client goes away. The limit on
    its life exists because a graceful uvicorn shutdown waits for open responses before it stops
    the app (and the node): a stream that ends on its own lets it proceed, within
    `MAX_STREAM_SECONDS` (a longer ``seconds`` is refused); the page's EventSource reconnects at once.
    """
    # Tell EventSource to reconnect after 1 s (its default is 3 s).
    yield "retry: 1000\n\n"
    ends = clock() + seconds
    previous: dict[str, tuple[int, int]] = {}
    last: float | None = None
    while not catga.node.stopped:
        now = clock()
        data = snapshot(catga, previous, 0.0 if last is None else now - last)
        yield f"data: {json.dumps(data)}\n\n"
        observer = _find_observer(catga)
        if observer is not None:
            previous = {name: (c.handled, c.failed) for name, c in observer.counts.items()}
        last = now
        if now + interval > ends:
            return
        await asyncio.sleep(interval)


@catga_dashboard_router.get("", response_class=HTMLResponse, summary="The live cluster page")
async def dashboard() -> HTMLResponse:
    page = files("fastapi_catga.web").joinpath("dashboard.html").read_text(encoding="utf-8")
    return HTMLResponse(page)


@catga_dashboard_router.get(
    "/events",
    summary="A JSON snapshot every `interval` seconds, as Server-Sent Events",
    response_class=StreamingResponse,
)
async def events(
    catga: CatgaDep,
    interval: Annotated[float, Query(ge=0.05, le=60, description="seconds between snapshots")] = 1.0,
    seconds: Annotated[
        float,
        Query(
            gt=0,
            le=MAX_STREAM_SECONDS,
            description="how long the stream stays open (the page reconnects); a graceful shutdown "
            "waits for it",
        ),
    ] = 10.0,
) -> StreamingResponse:
    return StreamingResponse(
        snapshots(catga, interval, seconds),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
