"""nats-py's errors as ours: one table, applied where the transport calls nats-py."""

from __future__ import annotations

import nats.errors
import nats.js.errors

from fastapi_catga.exceptions import (
    CatgaError,
    MessageTooLargeError,
    NoResponderError,
    RequestTimeoutError,
    TransportError,
)

__all__ = ["ERRORS", "NatsErrors", "raise_ours"]

_NO_JETSTREAM = (
    "{what}: JetStream did not answer (is the server started with -js? was the bucket prepared since?)"
)
_STREAM_GONE = (
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.NoStreamResponseError,  # the bucket's stream is gone: a server lost its store
)
_NOBODY = "nobody listens on {what}"
_NO_REPLY = "no reply on {what} within {timeout:.3f} s"
_NO_ANSWER = "{what}: NATS did not answer in time"
_TOO_LARGE = "{what}: over the server's max_payload"
_FAILED = "{what}: {kind}: {exc}"

Ours = tuple[type[CatgaError], str]

#: nats-py error(s) -> (ours inside a request, ours anywhere else); the first row that matches wins.
#: Inside a request (a reply awaited within a timeout) "no responders" and a timeout mean what they
#: say; anywhere else they mean NATS or JetStream failed to answer. A message may name {what} (the
#: subject or operation), {timeout}, {kind} (nats-py's class name) and {exc} (its message).
ERRORS: tuple[tuple[type[Exception] | tuple[type[Exception], ...], Ours, Ours], ...] = (
    (nats.errors.NoRespondersError, (NoResponderError, _NOBODY), (TransportError, _NO_JETSTREAM)),
    (_STREAM_GONE, (TransportError, _NO_JETSTREAM), (TransportError, _NO_JETSTREAM)),
    # TimeoutError: asyncio's, and nats.errors.TimeoutError, which is one too
    (TimeoutError, (RequestTimeoutError, _NO_REPLY), (TransportError, _NO_ANSWER)),
    (nats.errors.MaxPayloadError, (MessageTooLargeError, _TOO_LARGE), (MessageTooLargeError, _TOO_LARGE)),
    ((nats.errors.Error, OSError), (TransportError, _FAILED), (TransportError, _FAILED)),
)  # fmt: skip


class NatsErrors:
    """Raises nats-py's errors as ours (`ERRORS`), like httpx's ``map_httpcore_exceptions``.

    With ``timeout`` the block is a request: the table's middle column. Our own errors, and errors
    the table does not name, pass unchanged. A class, not a ``@contextmanager``: it wraps every
    request and reply, and costs a fifth as much.
    """

    __slots__ = ("timeout", "what")

    def __init__(self, what: str, timeout: float | None = None) -> None:
        self.what = what
        self.timeout = timeout

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            raise_ours(exc, self.what, self.timeout)


def raise_ours(exc: BaseException, what: str, timeout: float | None = None) -> None:
    """Raise ``exc`` as ours (`ERRORS`; ``timeout``: it arose in a request), from ``exc``; return
    when it is ours already or the table does not name it (the caller re-raises it unchanged).

    `NatsErrors` as a function, for an ``except`` clause on the hot path (a ``try`` costs nothing
    until something raises; the context manager is an object and two calls per use)."""
    if isinstance(exc, CatgaError):
        return
    for errors, in_request, elsewhere in ERRORS:
        if isinstance(exc, errors):
            ours, message = elsewhere if timeout is None else in_request
            text = message.format(what=what, timeout=timeout, kind=type(exc).__name__, exc=exc)
            raise ours(text) from exc
