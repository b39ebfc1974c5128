"""The ``@handler`` decorator and the registry that knows every handler of an app.

``@handler`` only declares: it reads the message type from the first parameter's annotation and
notes the function. An app's handlers are registered by building a `HandlerRegistry` from the
modules (or functions) it names, before the first message arrives.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar, get_type_hints

from fastapi_catga.core.messages import Command, Event, Message, Query, Request
from fastapi_catga.core.pipeline import Pipeline
from fastapi_catga.exceptions import ConfigurationError, DuplicateHandlerError

__all__ = ["HandlerRegistry", "HandlerSpec", "HandlerSource", "declared_handlers", "handler"]

_BASES = (Message, Request, Command, Query, Event)  # what no message is an instance of only

F = TypeVar("F", bound=Callable[..., Coroutine[Any, Any, Any]])
#: What an app names to register handlers: a module, a module's dotted name, or a function.
HandlerSource = ModuleType | str | Callable[..., Coroutine[Any, Any, Any]]

_TYPE_NAME = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


@dataclass(frozen=True, slots=True)
class HandlerSpec:
    """One declared handler: the function and the message type it takes."""

    func: Pipeline
    message_type: type[Message]

    @property
    def name(self) -> str:
        return f"{self.func.__module__}.{self.func.__qualname__}"


def check_type_name(message_type: type[Message]) -> str:
    """The type's wire name, once known to be one every broker can carry.

    Raises:
        ConfigurationError: it is not letters, digits, '_' and '-', in tokens joined by dots.
    """
    name = message_type.type_name
    if type(name) is not str or not _TYPE_NAME.fullmatch(name):
        raise ConfigurationError(
            f"{message_type.__qualname__}.type_name {name!r}: use letters, digits, '_', '-' and dots"
        )
    return name


# Declarations in import order. Append-only, like ``atexit``: registries are built from it by
# module name, so nothing here is state a test has to reset.
_declared: list[HandlerSpec] = []


def handler(func: F) -> F:
    """Declare ``async def f(message: SomeMessage) -> R`` as the handler of ``SomeMessage``.

    Commands and queries have exactly one handler in the cluster; events may have many.
    The function is returned unchanged, so it stays callable and testable on its own.

    Raises:
        ConfigurationError: the function is not ``async def``, or its first parameter is not
            annotated with a `Command`, `Query` or `Event` subclass.
    """
    _declared.append(HandlerSpec(func, _message_type_of(func)))
    return func


def declared_handlers() -> list[HandlerSpec]:
    """Every handler declared so far in this process, in import order."""
    return list(_declared)


def _message_type_of(func: Callable[..., Any]) -> type[Message]:
    where = f"{getattr(func, '__module__', '?')}.{getattr(func, '__qualname__', func)!s}"
    if not inspect.iscoroutinefunction(func):
        raise ConfigurationError(f"handler {where} must be an 'async def' function")
    params = list(inspect.signature(func).parameters.values())
    if not params:
        raise ConfigurationError(f"handler {where} must take the message as its first parameter")
    extra = [
        p.name for p in params[1:] if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if extra or params[0].kind is params[0].KEYWORD_ONLY:
        raise ConfigurationError(
            f"handler {where} is called with the message alone: give its other parameters "
            f"({', '.join(extra) or 'the first is keyword-only'}) defaults"
        )
    try:
        hints = get_type_hints(func)
    except Exception as exc:  # a NameError from a string annotation, typically
        raise ConfigurationError(f"handler {where}: cannot resolve its annotations ({exc})") from exc
    message_type = hints.get(params[0].name)
    if not (isinstance(message_type, type) and issubclass(message_type, Request | Event)):
        raise ConfigurationError(
            f"handler {where}: annotate its first parameter with a Command, Query or Event subclass "
            f"(got {message_type!r})"
        )
    if "[" in message_type.__name__ or message_type in _BASES:
        raise ConfigurationError(
            f"handler {where}: {message_type.__name__} is a base class, not a message: a handler of it "
            "would run only for that class itself (annotate it with your own subclass)"
        )
    return message_type


class HandlerRegistry:
    """The handlers one node runs: one per command or query type, any number per event type."""

    def __init__(self, specs: Iterable[HandlerSpec] = ()) -> None:
        self._requests: dict[type[Message], HandlerSpec] = {}
        self._events: dict[type[Message], list[HandlerSpec]] = {}
        self._types: dict[str, type[Message]] = {}
        for spec in specs:
            self.add(spec)

    @classmethod
    def from_sources(cls, sources: Iterable[HandlerSource]) -> HandlerRegistry:
        """Build a registry from modules (objects or dotted names, imported here) and functions."""
        registry = cls()
        for source in sources:
            if callable(source) and not isinstance(source, ModuleType):
                registry.add(HandlerSpec(source, _message_type_of(source)))
                continue
            module = _import(source) if isinstance(source, str) else source
            for spec in _declared:
                if spec.func.__module__ == module.__name__:
                    registry.add(spec)
        return registry

    @classmethod
    def from_declared(cls) -> HandlerRegistry:
        """Build a registry from every ``@handler`` imported so far in this process."""
        return cls(_declared)

    def add(self, spec: HandlerSpec) -> None:
        """Register one handler.

        Raises:
            DuplicateHandlerError: a command or query that already has a handler.
            ConfigurationError: two message classes share one wire ``type_name``.
        """
        message_type = spec.message_type
        self._add_type(message_type)
        if issubclass(message_type, Event):
            handlers = self._events.setdefault(message_type, [])
            if spec not in handlers:
                handlers.append(spec)
            return
        existing = self._requests.get(message_type)
        if existing is not None and existing.func is not spec.func:
            raise DuplicateHandlerError(
                f"{message_type.__name__} already has a handler, {existing.name}; {spec.name} would be a "
                "second one. A command or query has exactly one handler: remove one of them."
            )
        self._requests[message_type] = spec

    def _add_type(self, message_type: type[Message]) -> None:
        name = check_type_name(message_type)
        known = self._types.setdefault(name, message_type)
        if known is not message_type:
            raise ConfigurationError(
                f"{known.__module__}.{known.__qualname__} and {message_type.__module__}."
                f"{message_type.__qualname__} share the wire name {name!r}; set type_name on one of them"
            )

    @property
    def requests(self) -> Mapping[type[Message], HandlerSpec]:
        """Command and query types with their handler."""
        return self._requests

    @property
    def events(self) -> Mapping[type[Message], list[HandlerSpec]]:
        """Event types with their handlers."""
        return self._events

    def message_type(self, type_name: str) -> type[Message] | None:
        """The registered message class for a wire type name, or None."""
        return self._types.get(type_name)


def _import(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import handler module {name!r}: {exc}") from exc
