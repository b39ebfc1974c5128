"""`catga_lifespan`: starts the node with the app and stops it after, inside the app's own lifespan."""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, overload

from fastapi import FastAPI
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from starlette.applications import Starlette
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.routing import BaseRoute, Host, Mount

from fastapi_catga.bootstrap import Catga, build
from fastapi_catga.core.handlers import HandlerSource
from fastapi_catga.core.observe import Observer
from fastapi_catga.core.pipeline import PipelineBehavior
from fastapi_catga.exceptions import CatgaError
from fastapi_catga.settings import CatgaSettings
from fastapi_catga.transports.base import Transport
from fastapi_catga.web.dependencies import STATE_KEY
from fastapi_catga.web.errors import problem_response, validation_response

__all__ = ["catga_lifespan"]

logger = logging.getLogger(__name__)

Lifespan = (
    Callable[[FastAPI], AbstractAsyncContextManager[Mapping[str, Any] | None]]
    | Callable[[FastAPI], AsyncIterator[Mapping[str, Any] | None]]  # a bare async generator
)


@overload
def catga_lifespan(app: FastAPI, /) -> AbstractAsyncContextManager[dict[str, Any]]: ...


@overload
def catga_lifespan(
    *,
    settings: CatgaSettings | None = None,
    lifespan: Lifespan | None = None,
    handlers: Iterable[HandlerSource] | None = None,
    behaviors: Sequence[PipelineBehavior] = (),
    transport: Transport | None = None,
    observers: Sequence[Observer] = (),
) -> Callable[[FastAPI], AbstractAsyncContextManager[dict[str, Any]]]: ...


def catga_lifespan(
    app: FastAPI | None = None,
    /,
    *,
    settings: CatgaSettings | None = None,
    lifespan: Lifespan | None = None,
    handlers: Iterable[HandlerSource] | None = None,
    behaviors: Sequence[PipelineBehavior] = (),
    transport: Transport | None = None,
    observers: Sequence[Observer] = (),
) -> (
    AbstractAsyncContextManager[dict[str, Any]]
    | Callable[[FastAPI], AbstractAsyncContextManager[dict[str, Any]]]
):
    """Run a fastapi-catga node for the app's lifetime.

    Use it bare, ``FastAPI(lifespan=catga_lifespan)`` (settings from ``CATGA_*``, every imported
    ``@handler``), or configured, ``FastAPI(lifespan=catga_lifespan(handlers=[orders], ...))``.

    At start-up: enter ``lifespan`` if given (it opens what the handlers use), then connect,
    subscribe the handlers, join the cluster (the view is complete before the app serves). At
    shutdown, in reverse: deregister (peers drop the node at once), drain work in flight, close,
    then leave ``lifespan``: no handler runs before the app's own resources are open or after
    they are closed. It also installs the problem+json answer for `CatgaError`s escaping routes.

    Args:
        settings: defaults to `CatgaSettings` from the environment.
        lifespan: the app's own lifespan: the node runs inside it (it enters before the node
            starts and exits after the node stopped, so its start-up and shutdown code cannot use
            the mediator); state it yields is kept. An ``@asynccontextmanager`` function, or a bare
            async generator function as Starlette takes.
        handlers: modules, dotted module names or functions whose ``@handler``s to run.
        behaviors: pipeline behaviors, outermost first.
        transport: a ready transport instance (tests: an `InMemoryTransport` on a shared broker).
        observers: tracing and metrics hooks (see `build`); a metrics one also answers
            ``GET /catga/metrics`` on `catga_router`.

    Raises:
        TypeError: given something else than the app as its one positional argument (the app's
            own lifespan goes in ``lifespan=``), a ``lifespan=`` that is no function, or one that
            yields something else than a mapping or None.
    """
    if app is not None and not isinstance(app, Starlette):
        raise TypeError(
            f"catga_lifespan takes the app as its only positional argument, got {app!r}; "
            "pass your own lifespan as catga_lifespan(lifespan=...)"
        )
    if lifespan is not None and not callable(lifespan):
        raise TypeError(f"lifespan= takes the app's lifespan function, got {lifespan!r}")
    # A bare async generator is taken as Starlette takes one.
    user: Callable[[FastAPI], AbstractAsyncContextManager[Mapping[str, Any] | None]] | None = (
        asynccontextmanager(lifespan) if inspect.isasyncgenfunction(lifespan) else lifespan  # type: ignore[assignment]
    )

    @asynccontextmanager
    async def run(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        catga = build(
            settings, handlers=handlers, behaviors=behaviors, transport=transport, observers=observers
        )
        _install_error_handler(app)
        if user is None:
            async with _serving(app, catga):
                yield {STATE_KEY: catga}
            return
        # The app's own resources (a database pool) outlive the node: its handlers, here or for
        # other nodes, never run before they are open or after they are closed.
        async with user(app) as state:
            if state is not None and not isinstance(state, Mapping):
                raise TypeError(
                    f"the app's lifespan yielded {state!r}: a lifespan yields a mapping (its state) or None"
                )
            async with _serving(app, catga):
                yield {**(state or {}), STATE_KEY: catga}

    return run if app is None else run(app)


@asynccontextmanager
async def _serving(app: FastAPI, catga: Catga) -> AsyncIterator[None]:
    """The node started (joined, taking requests) for the block, and stopped (deregistered,
    drained, closed) after it."""
    await catga.start()
    setattr(app.state, STATE_KEY, catga)
    try:
        yield
    finally:
        try:
            await catga.stop()
        finally:
            if getattr(app.state, STATE_KEY, None) is catga:
                delattr(app.state, STATE_KEY)  # a stopped node serves nothing: routes say it is not running


def _apps_within(routes: Iterable[BaseRoute]) -> Iterator[Starlette]:
    """The apps mounted among ``routes``, under plain routers (``Mount(routes=...)``) and hosts too."""
    for route in routes:
        if isinstance(route, Mount | Host):
            if isinstance(route.app, Starlette):
                yield route.app
            else:
                yield from _apps_within(route.routes)


def _install_error_handler(app: Starlette) -> None:
    """The problem+json answer for `CatgaError`s, in ``app`` and the apps mounted in it, unless one
    has a handler of its own. Starlette builds an app's middleware stack, which holds the handlers,
    on the app's first ASGI call (this lifespan's, for the app the server runs): the handler goes
    into the built stack's `ExceptionMiddleware` as well. The stack is never built again, which
    would make the app's middleware anew."""
    for mounted in _apps_within(app.routes):
        _install_error_handler(mounted)
    handlers: dict[Any, Any] = {}
    if CatgaError not in app.exception_handlers:
        handlers[CatgaError] = problem_response
    if app.exception_handlers.get(RequestValidationError) is request_validation_exception_handler:
        handlers[RequestValidationError] = validation_response  # FastAPI's, made unable to fail
    if not handlers:
        return
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)
    layer: Any = app.middleware_stack
    for _ in range(1000):  # down the chain of middleware, each holding the next as ``app``
        if layer is None or isinstance(layer, ExceptionMiddleware):
            break
        layer = getattr(layer, "app", None)
    if isinstance(layer, ExceptionMiddleware):
        for kind, handler in handlers.items():
            layer.add_exception_handler(kind, handler)
    elif app.middleware_stack is not None and CatgaError in handlers:
        logger.warning(
            "could not reach the app's exception middleware past its own middleware: CatgaErrors "
            "escaping routes are 500s; add app.add_exception_handler(CatgaError, problem_response) "
            "before the app starts (from fastapi_catga.web.errors import problem_response)"
        )
