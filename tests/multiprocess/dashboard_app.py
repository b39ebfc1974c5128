"""The app the dashboard's browser test runs: the test app's handlers, `catga_router`, the dashboard
router and a `DashboardObserver` (settings from CATGA_*)."""

from __future__ import annotations

from fastapi import FastAPI

from fastapi_catga import (
    DashboardObserver,
    MediatorDep,
    catga_dashboard_router,
    catga_lifespan,
    catga_router,
)
from tests.multiprocess.app import Work, ping, work

app = FastAPI(lifespan=catga_lifespan(handlers=[work, ping], observers=[DashboardObserver()]))
app.include_router(catga_router)
app.include_router(catga_dashboard_router)


@app.post("/work/{node_id}")
async def send_work_to(node_id: str, mediator: MediatorDep) -> dict[str, str]:
    return {"node": await mediator.send_to_node(Work(), node_id)}
