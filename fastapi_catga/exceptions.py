"""The one error tree of fastapi-catga.

```
CatgaError
├── BusyError                              the node(s) had no room for another handler run: try later
├── ConfigurationError (ValueError)        bad settings, bad handler declarations
│   └── DuplicateHandlerError              a second handler for a command or query
├── HandlerNotFoundError (LookupError)     no handler for this message type, here or anywhere
├── MessageValidationError (ValueError)    the message does not match its schema, or is not a message
├── MessageTooLargeError (ValueError)      the encoded message is over the payload limit; nothing sent
├── NodeUnavailableError (ConnectionError) no live node can take it, or the named node is unknown or dead
│   └── IncompatibleSchemaError            the nodes that handle it run an incompatible schema of it
├── RequestTimeoutError (TimeoutError)     the deadline passed before an answer came
├── RemoteHandlerError                     the handler raised (on another node, or in this process)
├── RetryableError                         raised by a handler: another attempt (or node) may succeed
│   └── RetryLater                         raised by a durable handler: run it again after ``delay`` s
├── Reject                                 raised by a durable handler: dead-letter it now, no retry
└── TransportError (ConnectionError)       the broker failed or is unreachable
    └── NoResponderError                   the broker says nobody listens on that address
```

Every error carries a stable ``code`` used in problem+json answers. An error a handler raised on
one node is raised on the node that asked as the same class, subclasses of your own included,
when that class is defined in the asking process (the same app runs on every node); otherwise as
its nearest base class that is. Classes are looked up among those already defined in the process,
never imported by a name that came over the wire.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "BusyError",
    "CatgaError",
    "ConfigurationError",
    "DuplicateHandlerError",
    "HandlerNotFoundError",
    "IncompatibleSchemaError",
    "MessageTooLargeError",
    "MessageValidationError",
    "NoResponderError",
    "NodeUnavailableError",
    "RemoteHandlerError",
    "RequestTimeoutError",
    "Reject",
    "RetryLater",
    "RetryableError",
    "TransportError",
    "asks_for_retry",
    "error_class_for",
    "error_class_for_code",
    "error_lineage",
    "rebuild_error",
]


# Every CatgaError class defined in this process, by "module.qualname": the only classes an
# error arriving from another node can become.
_DEFINED: dict[str, type[CatgaError]] = {}


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class CatgaError(Exception):
    """Root of every error fastapi-catga raises on purpose; subclass it for your handlers' errors."""

    code: ClassVar[str] = "catga_error"
    #: The HTTP status of the problem+json answer when the error escapes a route (400-599); None
    #: (the default): by its nearest built-in family, 500 for a class of none (README, Errors).
    http_status: ClassVar[int | None] = None
    #: Whether another attempt may succeed. The retry behavior retries such errors in place;
    #: across nodes only a `RetryableError` a handler raised is tried again.
    retryable: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _DEFINED[_qualified(cls)] = cls

    def __init__(self, message: str, *, node_id: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.node_id = node_id
        self.details = details

    def __str__(self) -> str:
        return self.message


class BusyError(CatgaError):
    """No room: the node (every node tried, for a ``send``) already runs as many handlers as its
    ``CATGA_MAX_IN_FLIGHT*`` limits allow. Nothing ran; the web layer answers 503 with ``Retry-After``.

    A node's own "busy" reply moves a ``send`` on to another node at once. A handler may raise it
    too (say, for a downstream service that is full): that is the handler's answer, returned once.
    """

    code = "busy"
    retryable = True  # later, or elsewhere: the retry behavior may try it again in place
    #: Seconds after which trying again makes sense (the ``Retry-After`` of a 503 answer).
    retry_after: ClassVar[int] = 1


class ConfigurationError(CatgaError, ValueError):
    """Settings or handler declarations that cannot work; raised at start-up."""

    code = "configuration_error"


class DuplicateHandlerError(ConfigurationError):
    """A command or query got a second handler; each has exactly one in the cluster."""

    code = "duplicate_handler"


class HandlerNotFoundError(CatgaError, LookupError):
    """No handler for the message type, on this node or on any live node."""

    code = "handler_not_found"


class MessageValidationError(CatgaError, ValueError):
    """The message does not match its schema; ``details`` holds pydantic's error list."""

    code = "invalid_message"


class MessageTooLargeError(CatgaError, ValueError):
    """The encoded message is larger than the payload limit; nothing was sent."""

    code = "message_too_large"


class NodeUnavailableError(CatgaError, ConnectionError):
    """No live node can take the message, or the named node is unknown or dead."""

    code = "node_unavailable"


class IncompatibleSchemaError(NodeUnavailableError):
    """The only nodes that handle the type run a schema of it this node's message (or result)
    does not fit: a rolling upgrade with an incompatible change. ``details`` maps each such node to
    what differs; nothing was sent."""

    code = "incompatible_schema"


class RequestTimeoutError(CatgaError, TimeoutError):
    """The deadline passed before any node answered."""

    code = "timeout"


class RemoteHandlerError(CatgaError):
    """The handler raised. ``error_type`` names the exception class, ``node_id`` where it ran.

    The original exception is never shipped between nodes (nothing received is unpickled); when
    the handler ran in this process it is also the ``__cause__``.
    """

    code = "handler_error"

    def __init__(
        self,
        message: str,
        *,
        error_type: str = "Exception",
        node_id: str | None = None,
        retryable: bool = False,
        details: Any = None,
    ) -> None:
        super().__init__(message, node_id=node_id, details=details)
        self.error_type = error_type
        self.retryable = retryable


class RetryableError(CatgaError):
    """Raise (or subclass) this in a handler to say "another attempt may succeed".

    The retry behavior retries it in place; a remote caller retries it on another node.
    """

    code = "retryable_error"
    retryable = True


class RetryLater(RetryableError):
    """Raise in a durable message's handler to have it run again after ``delay`` seconds.

    It counts as an attempt; after the last one the message is dead-lettered.
    """

    code = "retry_later"

    def __init__(self, message: str = "retry later", *, delay: float = 0.0, details: Any = None) -> None:
        super().__init__(message, details=details)
        self.delay = delay


class Reject(CatgaError):
    """Raise in a durable message's handler to dead-letter it at once: no retry can succeed."""

    code = "rejected"


class TransportError(CatgaError, ConnectionError):
    """The broker failed, or is unreachable."""

    code = "transport_error"
    retryable = True


class NoResponderError(TransportError):
    """The broker says nobody listens on that address (NATS 503, Redis ``PUBLISH`` = 0)."""

    code = "no_responder"


_BY_CODE: dict[str, type[CatgaError]] = {
    cls.code: cls
    for cls in (
        CatgaError,
        BusyError,
        ConfigurationError,
        DuplicateHandlerError,
        HandlerNotFoundError,
        MessageValidationError,
        MessageTooLargeError,
        NodeUnavailableError,
        IncompatibleSchemaError,
        RequestTimeoutError,
        RemoteHandlerError,
        RetryableError,
        RetryLater,
        Reject,
        TransportError,
        NoResponderError,
    )
}


def asks_for_retry(error: CatgaError) -> bool:
    """Whether an error a handler raised asks for another attempt, on another node where there is
    one: a `RetryableError`, or a `RemoteHandlerError` for an exception that says ``retryable = True``."""
    return isinstance(error, RetryableError) or (isinstance(error, RemoteHandlerError) and error.retryable)


def error_class_for_code(code: str) -> type[CatgaError]:
    """The error class for a wire code; unknown codes map to `RemoteHandlerError`."""
    return _BY_CODE.get(code, RemoteHandlerError)


_DEFINED[_qualified(CatgaError)] = CatgaError


def error_lineage(exc: CatgaError) -> list[str]:
    """The qualified names of the error's class and its `CatgaError` bases, nearest first."""
    return [_qualified(cls) for cls in type(exc).__mro__ if issubclass(cls, CatgaError)]


def error_class_for(lineage: object, code: str) -> type[CatgaError]:
    """The first class of ``lineage`` defined in this process, else the class of ``code``."""
    if isinstance(lineage, list):
        for name in lineage:
            cls = _DEFINED.get(name) if isinstance(name, str) else None
            if cls is not None:
                return cls
    return error_class_for_code(code)


def rebuild_error(
    cls: type[CatgaError], message: str, *, node_id: str | None, details: Any, retryable: bool
) -> CatgaError:
    """An instance of ``cls`` carrying what crossed the wire, without calling its own ``__init__``
    (a subclass of yours may take other arguments); attributes it would set there are absent. A
    class that refuses them (a read-only ``retryable`` or ``message`` property) gives way to its
    nearest base that takes them, `CatgaError` at the last: every error reply reads as an error."""
    for base in cls.__mro__:
        if not (isinstance(base, type) and issubclass(base, CatgaError)):
            continue
        try:
            error = base.__new__(base)
            CatgaError.__init__(error, message, node_id=node_id, details=details)
            error.retryable = retryable
        except Exception:  # the next base, down to CatgaError, which takes them
            continue
        return error
    return CatgaError(message, node_id=node_id, details=details)  # pragma: no cover - CatgaError takes them
