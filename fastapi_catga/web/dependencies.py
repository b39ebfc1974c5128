"""`get_mediator`: the FastAPI dependency that hands routes the running node's `Mediator`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from fastapi_catga.bootstrap import Catga
from fastapi_catga.core.mediator import Mediator
from fastapi_catga.exceptions import ConfigurationError

__all__ = ["MediatorDep", "get_catga", "get_mediator"]

#: Where the lifespan leaves the running node, in its state and in ``app.state``: a name the app's
#: own state would not use.
STATE_KEY = "fastapi_catga"


# Both dependencies are `async def` although they never await: FastAPI runs a plain `def` dependency
# in its thread pool, a thread hop per request (~0.3 ms of CPU per POST on a 2-core box: more than
# the whole cross-node send the route then makes).
async def get_catga(request: HTTPConnection) -> Catga:
    """The running node, as the lifespan left it in the app state (HTTP and WebSocket routes)."""
    return _running(request)


async def get_mediator(request: HTTPConnection) -> Mediator:
    """Use as ``mediator: Mediator = Depends(get_mediator)``, in HTTP and WebSocket routes."""
    return _running(request).mediator


def _running(request: HTTPConnection) -> Catga:
    catga = getattr(request.state, STATE_KEY, None) or getattr(request.app.state, STATE_KEY, None)
    if not isinstance(catga, Catga):
        raise ConfigurationError(
            "fastapi-catga is not running in this app: create it with FastAPI(lifespan=catga_lifespan) "
            "(or wrap your lifespan with catga_lifespan(lifespan=...)). The lifespan runs only for the "
            "app the server runs, not for a mounted sub-app, and in tests only inside "
            "`with TestClient(app) as client:`"
        )
    return catga


#: ``mediator: MediatorDep`` in a route signature, the `Annotated` spelling of ``Depends(get_mediator)``.
MediatorDep = Annotated[Mediator, Depends(get_mediator)]
