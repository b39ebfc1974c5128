"""The README's "Protecting the routes" example, run by tests/web/test_protected_routes.py."""

import os
import secrets

from fastapi import Depends, FastAPI, HTTPException, Security
from fastapi.security import APIKeyHeader

from fastapi_catga import (
    catga_admin_router,
    catga_cluster_router,
    catga_dashboard_router,
    catga_health_router,
    catga_lifespan,
)

api_key = APIKeyHeader(name="X-API-Key")


def require_api_key(key: str = Security(api_key)) -> None:
    if not secrets.compare_digest(key, os.environ["OPS_API_KEY"]):
        raise HTTPException(403, "wrong API key")


app = FastAPI(lifespan=catga_lifespan)
guard = [Depends(require_api_key)]
app.include_router(catga_health_router)  # open: the load balancer's probe
app.include_router(catga_cluster_router, dependencies=guard)  # /catga/nodes, /catga/metrics
app.include_router(catga_admin_router, dependencies=guard)  # dead letters
app.include_router(catga_dashboard_router, dependencies=guard)  # the page and its event stream
