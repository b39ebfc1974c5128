"""`catga_router`: ``/catga/nodes``, ``/catga/nodes/current``, ``/catga/health`` and, with a metrics
observer installed, ``/catga/metrics``.

It is two routers in one, so the health probe can stay open while the rest sits behind your auth::

    app.include_router(catga_health_router)                                     # /catga/health
    app.include_router(catga_cluster_router, dependencies=[Depends(require_key)])  # the rest

``app.include_router(catga_router, dependencies=[...])`` protects all of it, health included.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from pydantic import Field

from fastapi_catga.bootstrap import Catga
from fastapi_catga.core.nodes import NodeInfo
from fastapi_catga.core.observe import MetricsSource
from fastapi_catga.web.dependencies import get_catga

__all__ = ["NodeStatus", "catga_cluster_router", "catga_health_router", "catga_router"]

#: ``/catga/nodes``, ``/catga/nodes/current`` and ``/catga/metrics``: what `catga_router` has but health.
catga_cluster_router = APIRouter(prefix="/catga", tags=["catga"])
#: ``/catga/health`` alone, for a probe that needs no credentials.
catga_health_router = APIRouter(prefix="/catga", tags=["catga"])
CatgaDep = Annotated[Catga, Depends(get_catga)]


class NodeStatus(NodeInfo):
    """A live node as the answering node sees it."""

    incompatible: dict[str, str] = Field(
        default_factory=dict,
        description="Message types this node does not send there: their schemas differ incompatibly "
        "(what differs, per type). See docs/production.md, Rolling upgrades",
    )


@catga_cluster_router.get("/nodes", response_model=list[NodeStatus], summary="Live nodes, this one included")
async def list_nodes(catga: CatgaDep) -> list[NodeStatus]:
    view = catga.node.view
    return [
        NodeStatus(**node.model_dump(), incompatible=view.schemas.incompatibilities(node))
        for node in await catga.mediator.get_nodes()
    ]


@catga_cluster_router.get("/nodes/current", response_model=NodeStatus, summary="The node that answers")
async def current_node(catga: CatgaDep) -> NodeStatus:
    return NodeStatus(**(await catga.mediator.get_current_node()).model_dump())


@catga_health_router.head("/health", include_in_schema=False)  # load balancers' probes send HEAD too
@catga_health_router.get(
    "/health",
    summary="Transport and membership state",
    responses={503: {"description": "The broker, or the membership store on it, is unreachable"}},
)
async def health(catga: CatgaDep) -> JSONResponse:
    state: dict[str, Any] = catga.node.health()
    return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)


@catga_cluster_router.get(
    "/metrics",
    summary="Metrics in the Prometheus text format",
    responses={404: {"description": "No metrics observer is installed"}},
)
async def metrics(catga: CatgaDep) -> Response:
    """What the installed `PrometheusObserver` renders; 404 without one (the route is then unused)."""
    for observer in catga.observers:
        if isinstance(observer, MetricsSource):
            body, content_type = observer.render_metrics()
            return Response(body, media_type=content_type)
    return JSONResponse({"detail": "no metrics observer installed (PrometheusObserver)"}, status_code=404)


#: Every route above: ``app.include_router(catga_router)``.
catga_router = APIRouter()
catga_router.include_router(catga_cluster_router)
catga_router.include_router(catga_health_router)
