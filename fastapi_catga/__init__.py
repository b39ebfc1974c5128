"""fastapi-catga: a typed CQRS mediator for FastAPI whose app instances form one cluster.

from fastapi import Depends, FastAPI
from fastapi_catga import Mediator, Query, catga_lifespan, catga_router, get_mediator, handler

class Greet(Query[str]):
    name: str

@handler
async def greet(query: Greet) -> str:
    return f"hello {query.name}"

app = FastAPI(lifespan=catga_lifespan)
app.include_router(catga_router)

@app.get("/greet/{name}")
async def hello(name: str, mediator: Mediator = Depends(get_mediator)) -> str:
    return await mediator.send(Greet(name=name))
"""

from fastapi_catga._version import __version__
from fastapi_catga.bootstrap import Catga, build
from fastapi_catga.core.behaviors import IdempotencyBehavior, LoggingBehavior, RetryBehavior, TimeoutBehavior
from fastapi_catga.core.dead_letter import DeadLetter
from fastapi_catga.core.handlers import handler
from fastapi_catga.core.mediator import Mediator
from fastapi_catga.core.messages import (
    Accepted,
    Command,
    Durable,
    Event,
    Message,
    Query,
    Request,
    new_message_id,
)
from fastapi_catga.core.nodes import NodeInfo
from fastapi_catga.core.pipeline import CallNext, PipelineBehavior
from fastapi_catga.exceptions import (
    BusyError,
    CatgaError,
    ConfigurationError,
    DuplicateHandlerError,
    HandlerNotFoundError,
    IncompatibleSchemaError,
    MessageTooLargeError,
    MessageValidationError,
    NodeUnavailableError,
    NoResponderError,
    Reject,
    RemoteHandlerError,
    RequestTimeoutError,
    RetryableError,
    RetryLater,
    TransportError,
)
from fastapi_catga.settings import CatgaSettings, load_settings
from fastapi_catga.transports import Transport
from fastapi_catga.web.admin import catga_admin_router
from fastapi_catga.web.dashboard import DashboardObserver, catga_dashboard_router
from fastapi_catga.web.dependencies import MediatorDep, get_mediator
from fastapi_catga.web.lifespan import catga_lifespan
from fastapi_catga.web.router import catga_cluster_router, catga_health_router, catga_router

__all__ = [
    "__version__",
    "Accepted",
    "build",
    "BusyError",
    "CallNext",
    "Catga",
    "catga_admin_router",
    "catga_cluster_router",
    "catga_dashboard_router",
    "catga_health_router",
    "catga_lifespan",
    "catga_router",
    "CatgaError",
    "CatgaSettings",
    "Command",
    "ConfigurationError",
    "DashboardObserver",
    "DeadLetter",
    "DuplicateHandlerError",
    "Durable",
    "Event",
    "get_mediator",
    "handler",
    "HandlerNotFoundError",
    "IdempotencyBehavior",
    "IncompatibleSchemaError",
    "load_settings",
    "LoggingBehavior",
    "Mediator",
    "MediatorDep",
    "Message",
    "MessageTooLargeError",
    "MessageValidationError",
    "new_message_id",
    "NodeInfo",
    "NodeUnavailableError",
    "NoResponderError",
    "PipelineBehavior",
    "Query",
    "Reject",
    "RemoteHandlerError",
    "Request",
    "RequestTimeoutError",
    "RetryableError",
    "RetryBehavior",
    "RetryLater",
    "TimeoutBehavior",
    "Transport",
    "TransportError",
]
