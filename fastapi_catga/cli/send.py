"""``catga send TYPE JSON``: a command or query by its wire type name, from a client that runs no handler.

The envelope carries the headers `encode_message` sets (message id, type, source, attempt, deadline);
the body is the JSON given, with its ``message_id`` (a fresh one unless the JSON has one). It goes to
``node.<id>`` of the node named, or of a live node whose record lists the type; on NATS, with no
such record, to the type's queue group ``type.<name>``.
"""

from __future__ import annotations

import json
import math
import random
import secrets
import time
from typing import Any, NoReturn

from fastapi_catga.cli.commands import Context, connected, emit, members
from fastapi_catga.cli.exits import FAILED, OK, USAGE, Exit
from fastapi_catga.cli.render import dumps
from fastapi_catga.cluster.responder import node_subject, type_subject
from fastapi_catga.core.envelope import (
    ATTEMPT,
    DEADLINE,
    MESSAGE_ID,
    MESSAGE_TYPE,
    NODE,
    SOURCE,
    STATUS,
    Envelope,
    deadline_header,
    error_from_reply,
    made_by_node,
)
from fastapi_catga.core.messages import new_message_id
from fastapi_catga.exceptions import HandlerNotFoundError, NoResponderError, RequestTimeoutError
from fastapi_catga.transports import Transport

__all__ = ["parse_body", "send"]


def parse_body(text: str) -> dict[str, Any]:
    """The message's fields: a JSON object (exit 2 otherwise), with a ``message_id``."""
    try:
        body = json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except ValueError as exc:
        raise Exit(USAGE, f"JSON is not valid JSON ({exc}); give the message's fields, e.g. '{{}}'") from None
    if not isinstance(body, dict):
        raise Exit(USAGE, 'JSON must be an object of the message\'s fields, e.g. \'{"sku": "apple"}\'')
    if "message_id" not in body:
        body["message_id"] = new_message_id()
    elif not isinstance(body["message_id"], str) or not body["message_id"]:  # not replaced unsaid
        raise Exit(USAGE, f"message_id is a non-empty string, got {json.dumps(body['message_id'])}")
    return body


def _no_constant(name: str) -> NoReturn:
    """NaN and Infinity, which Python's JSON reads and no other JSON does."""
    raise ValueError(f"{name} is no JSON number")


def _finite(text: str) -> float:
    """A JSON number too large for a float (``1e999``) would go out as Infinity."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is too large a number")
    return value


def _envelope(type_name: str, body: dict[str, Any], deadline: float) -> Envelope:
    headers = {
        MESSAGE_ID: body["message_id"],
        MESSAGE_TYPE: type_name,
        SOURCE: f"catga-cli-{secrets.token_hex(4)}",
        ATTEMPT: "1",
        DEADLINE: deadline_header(deadline),
    }
    return Envelope(headers, json.dumps(body, separators=(",", ":")).encode())


async def _targets(ctx: Context, transport: Transport, type_name: str) -> list[str]:
    """The subjects to try, in order: every live node that handles the type, shuffled."""
    found = await members(ctx, transport)
    capable = [node.node_id for node in found if type_name in node.handles]
    random.shuffle(capable)
    if capable:
        return [node_subject(node_id) for node_id in capable]
    if any(type_name in node.events for node in found):
        raise Exit(FAILED, f"{type_name!r} is an event type; send takes a command or query")
    if transport.supports_queue_groups:
        return [type_subject(type_name)]
    handled = sorted({name for node in found for name in node.handles})
    raise Exit(
        FAILED,
        f"no live node handles {type_name!r} in {ctx.where} (unknown type?); "
        f"types handled there: {', '.join(handled) or 'none'}",
    )


async def _request(
    transport: Transport, subjects: list[str], envelope: Envelope, deadline: float
) -> Envelope:
    """The first answer, trying the next subject where nobody listens or the node has no handler."""
    for attempt, subject in enumerate(subjects, 1):
        envelope.headers[ATTEMPT] = str(attempt)
        try:
            reply = await transport.request(subject, envelope, timeout=max(0.001, deadline - time.time()))
        except NoResponderError:
            continue  # the node stopped since its last heartbeat
        last = attempt == len(subjects)
        if last or not (
            reply.headers.get(STATUS) == "error"
            and made_by_node(reply)
            and isinstance(error_from_reply(reply), HandlerNotFoundError)
        ):
            return reply
    raise NoResponderError(f"nobody listens on {', '.join(subjects)}")


async def send(ctx: Context, type_name: str, text: str, node_id: str | None, timeout: float | None) -> int:
    """``catga send``: print the result; on an error reply, the error (exit 1)."""
    body = parse_body(text)
    budget = timeout if timeout is not None else ctx.settings.request_timeout
    async with connected(ctx) as transport:
        subjects = [node_subject(node_id)] if node_id else await _targets(ctx, transport, type_name)
        deadline = time.time() + budget
        try:
            reply = await _request(transport, subjects, _envelope(type_name, body, deadline), deadline)
        except NoResponderError:
            if node_id:
                raise Exit(FAILED, f"no live node {node_id!r} in {ctx.where}") from None
            raise Exit(FAILED, f"no live node answers {type_name!r} in {ctx.where} (unknown type?)") from None
        except RequestTimeoutError:
            raise Exit(FAILED, f"no answer to {type_name} within {budget:g} s") from None
    return _show(ctx, reply, body["message_id"])


def _show(ctx: Context, reply: Envelope, message_id: str) -> int:
    node = reply.headers.get(NODE)
    if reply.headers.get(STATUS) != "error":
        try:
            result: Any = json.loads(reply.body)
        except ValueError:
            result = reply.body.decode(errors="replace")
        answer = {"ok": True, "node": node, "message_id": message_id, "result": result}
        emit(dumps(answer, indent=None) if ctx.as_json else dumps(result))
        return OK
    info = _error(reply)
    if ctx.as_json:
        emit(dumps({"ok": False, "node": node, "message_id": message_id, "error": info}, indent=None))
        raise Exit(FAILED)
    lines = [
        f"error reply from node {info['node']}: {info['message']}",
        f"  code: {info['code']}",
        f"  type: {info['error_type']}",
    ]
    if info["details"] is not None:
        lines.append(f"  details: {dumps(info['details'], indent=None)}")
    raise Exit(FAILED, "\n".join(lines))


def _error(reply: Envelope) -> dict[str, Any]:
    """What an error reply says, as the node sent it: its code and error type may name classes of
    the app, which this process does not define."""
    error = error_from_reply(reply)  # also reads a reply that is no error JSON
    info = {
        "code": error.code,
        "message": error.message,
        "node": error.node_id,
        "error_type": type(error).__name__,
        "details": error.details,
    }
    try:
        sent = json.loads(reply.body)
    except ValueError:
        return info
    if isinstance(sent, dict):
        info.update(
            {name: sent[name] for name in ("code", "message", "error_type", "details") if name in sent}
        )
    return info
