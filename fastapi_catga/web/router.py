"""`catga_router`: ``/catga/nodes``, ``/catga/nodes/current`` and ``/catga/health``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from fastapi_catga.bootstrap import Catga
from fastapi_catga.core.nodes import NodeInfo
from fastapi_catga.web.dependencies import get_catga

__all__ = ["catga_router"]

catga_router = APIRouter(prefix="/catga", tags=["catga"])
CatgaDep = Annotated[Catga, Depends(get_catga)]


@catga_router.get("/nodes", response_model=list[NodeInfo], summary="Live nodes, this one included")
async def list_nodes(catga: CatgaDep) -> list[NodeInfo]:
    return await catga.mediator.get_nodes()


@catga_router.get("/nodes/current", response_model=NodeInfo, summary="The node that answers")
async def current_node(catga: CatgaDep) -> NodeInfo:
    return await catga.mediator.get_current_node()


@catga_router.get(
    "/health",
    summary="Transport and membership state",
    responses={503: {"description": "The broker, or the membership store on it, is unreachable"}},
)
async def health(catga: CatgaDep) -> JSONResponse:
    state: dict[str, Any] = catga.node.health()
    return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)
