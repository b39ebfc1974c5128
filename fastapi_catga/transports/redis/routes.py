"""Where a Redis request frame is answered: pub/sub has no reply subject, so the frame carries it."""

from __future__ import annotations

import asyncio

from fastapi_catga.core.envelope import Envelope

__all__ = ["end_with", "take_route", "with_route"]

# Request frames carry where to answer and which request of the requester's it is.
_REPLY_TO = "catga-reply-to"
_CORR = "catga-corr"


def with_route(envelope: Envelope, reply_to: str | None = None, corr: str | None = None) -> Envelope:
    """The envelope with a reply channel and a correlation id added to its headers."""
    headers = dict(envelope.headers)
    if reply_to is not None:
        headers[_REPLY_TO] = reply_to
    if corr is not None:
        headers[_CORR] = corr
    return Envelope(headers, envelope.body)


def take_route(envelope: Envelope) -> tuple[str | None, str | None]:
    """Take the reply channel and the correlation id out of a received frame's headers."""
    reply_to, corr = envelope.headers.pop(_REPLY_TO, None), envelope.headers.pop(_CORR, None)
    return (reply_to if isinstance(reply_to, str) else None), (corr if isinstance(corr, str) else None)


def end_with(sent: asyncio.Future[int], reply: asyncio.Future[Envelope]) -> None:
    """A request ended (timed out, or its connection was lost) while its PUBLISH may still wait:
    end that wait with the same error."""
    if not sent.done() and not reply.cancelled() and (error := reply.exception()) is not None:
        sent.set_exception(error)
