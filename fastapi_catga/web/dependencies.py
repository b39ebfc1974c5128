"""`get_mediator`: the FastAPI dependency that hands routes the running node's `Mediator`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from fastapi_catga.bootstrap import Catga
from fastapi_catga.core.mediator import Mediator
from fastapi_catga.exceptions import ConfigurationError

__all__ = ["MediatorDep", "get_catga", "get_mediator"]

STATE_KEY = "catga"


def get_catga(request: Request) -> Catga:
    """The running node, as the lifespan left it in the app state."""
    catga = getattr(request.state, STATE_KEY, None) or getattr(request.app.state, STATE_KEY, None)
    if not isinstance(catga, Catga):
        raise ConfigurationError(
            "fastapi-catga is not running in this app: create it with FastAPI(lifespan=catga_lifespan) "
            "(or wrap your lifespan with catga_lifespan(lifespan=...))"
        )
    return catga


def get_mediator(request: Request) -> Mediator:
    """Use as ``mediator: Mediator = Depends(get_mediator)``."""
    return get_catga(request).mediator


#: ``mediator: MediatorDep`` in a route signature, the `Annotated` spelling of ``Depends(get_mediator)``.
MediatorDep = Annotated[Mediator, Depends(get_mediator)]
