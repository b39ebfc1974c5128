"""The commands that read the broker once: ``nodes``, ``health``, ``dead-letters``; and the
connection every command opens (a client of the broker only: it joins no cluster, runs no handler)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from fastapi_catga.cli.exits import FAILED, OK, UNREACHABLE, Exit, exit_for
from fastapi_catga.cli.render import (
    LETTER_COLUMNS,
    NODE_COLUMNS,
    dead_letter_rows,
    dumps,
    fields,
    node_rows,
    table,
)
from fastapi_catga.cluster.durable_client import DeadLetters, PreparedStore
from fastapi_catga.cluster.identity import read_record
from fastapi_catga.core.dead_letter import DeadLetter
from fastapi_catga.core.envelope import Envelope
from fastapi_catga.core.logs import redact_url
from fastapi_catga.core.nodes import NodeInfo
from fastapi_catga.exceptions import CatgaError
from fastapi_catga.settings import CatgaSettings
from fastapi_catga.transports import Transport, create_transport

__all__ = ["Context", "connected", "dead_letters", "health", "members", "nodes", "within"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

MEMORY = (
    "CATGA_TRANSPORT is memory (the default): the in-memory transport lives inside one app process, "
    "so there is no broker to ask; set CATGA_TRANSPORT=nats or redis (or --transport) and its URL"
)


@dataclass(frozen=True, slots=True)
class Context:
    """What every command gets: the settings, the output format, how long the broker may take."""

    settings: CatgaSettings
    as_json: bool = False
    broker_timeout: float = 5.0

    @property
    def url(self) -> str:
        """The broker's URL, without its password."""
        settings = self.settings
        url = {"nats": settings.nats_url, "redis": settings.redis_url}.get(settings.transport, "")
        return redact_url(url)

    @property
    def where(self) -> str:
        """``cluster 'catga' on nats (nats://host:4222)``: for messages."""
        return f"cluster {self.settings.cluster!r} on {self.settings.transport} ({self.url})"


@asynccontextmanager
async def connected(ctx: Context) -> AsyncIterator[Transport]:
    """A connection to the broker the settings name, closed after.

    Raises:
        Exit: 3 for the in-memory transport, a missing broker client, or a broker that did not
            answer within ``ctx.broker_timeout``.
    """
    if ctx.settings.transport == "memory":
        raise Exit(UNREACHABLE, MEMORY)
    try:
        transport = create_transport(ctx.settings)
    except ImportError as exc:
        extra = ctx.settings.transport
        raise Exit(
            UNREACHABLE, f"the {extra} transport needs {exc.name}: pip install 'fastapi-catga[{extra}]'"
        ) from exc
    try:
        # A second more than the transport's own bound (5 s), so that its error, which says why
        # (connection refused, bad credentials), is the one shown.
        await within(ctx, transport.connect(), f"connecting to {ctx.url}", grace=1.0)
        yield transport
    finally:
        await transport.aclose()


async def within(ctx: Context, call: Awaitable[T], what: str, grace: float = 0.0) -> T:
    """``await call``, which the broker must answer within ``ctx.broker_timeout`` (else exit 3)."""
    try:
        async with asyncio.timeout(ctx.broker_timeout + grace):
            return await call
    except TimeoutError as exc:
        if isinstance(exc, CatgaError):
            raise
        raise Exit(
            UNREACHABLE, f"{what}: the broker did not answer within {ctx.broker_timeout + grace:g} s"
        ) from None


def parse_records(records: dict[str, bytes]) -> list[NodeInfo]:
    """The node records of a membership store, by node id; unreadable ones are skipped (logged)."""
    found: list[NodeInfo] = []
    for key, value in sorted(records.items()):
        try:
            found.append(read_record(key, value))
        except ValueError as exc:
            logger.warning("ignoring the membership record under %r: %s", key[:80], exc)
    return found


async def members(ctx: Context, transport: Transport) -> list[NodeInfo]:
    """The live members, straight from the broker's membership store."""
    store = transport.members
    await within(ctx, store.prepare(ctx.settings.node_ttl), "preparing the membership store")
    return parse_records(await within(ctx, store.list(), "listing the members"))


def emit(text: str) -> None:
    """Print a result to stdout at once (a watch's reader sees each line as it happens)."""
    print(text, flush=True)


async def nodes(ctx: Context) -> int:
    """``catga nodes``: the live members as a table, or as a JSON array of NodeInfo."""
    async with connected(ctx) as transport:
        found = await members(ctx, transport)
    if ctx.as_json:
        emit(dumps([node.model_dump(mode="json") for node in found]))
    elif found:
        emit(table(NODE_COLUMNS, node_rows(found, datetime.now(UTC))))
        emit(f"\n{len(found)} node(s) in {ctx.where}")
    else:
        emit(f"no live nodes in {ctx.where}")
    return OK


async def health(ctx: Context) -> int:
    """``catga health``: connect and ask the membership store; 0 when it answers, 3 otherwise."""
    report: dict[str, Any] = {  # the same keys either way: null where there is nothing to say
        "healthy": False,
        "transport": ctx.settings.transport,
        "broker": ctx.url,
        "cluster": ctx.settings.cluster,
        "members": None,
        "error": None,
    }
    try:
        async with connected(ctx) as transport:
            report["members"] = len(await members(ctx, transport))
            report["healthy"] = transport.connected
    except (Exit, CatgaError) as exc:
        failure = exc if isinstance(exc, Exit) else exit_for(exc)
        if not ctx.as_json:
            raise failure from None
        report["error"] = failure.message
        emit(dumps(report))
        return UNREACHABLE
    if ctx.as_json:
        emit(dumps(report))
    else:
        emit(fields([(name, str(value)) for name, value in report.items() if value is not None]))
    return OK if report["healthy"] else UNREACHABLE


async def dead_letters(ctx: Context, action: str, letter_id: str | None, limit: int) -> int:
    """``catga dead-letters list|get|replay|discard``."""
    settings = ctx.settings
    async with connected(ctx) as transport:
        # Makes the dead-letter stream where no node made it yet; what exists stays as it is.
        store = PreparedStore(
            transport,
            lambda: transport.durable.prepare(
                [],
                lease=settings.durable_lease,
                dedup_window=settings.durable_dedup_window,
                retention=settings.durable_retention,
            ),
        )
        await within(ctx, store.ready(), "preparing the durable store")
        letters = DeadLetters(store)
        if action == "list":
            found = await within(ctx, letters.list(limit), "listing dead letters")
            if ctx.as_json:
                emit(dumps([letter.model_dump(mode="json") for letter in found]))
            elif found:
                emit(table(LETTER_COLUMNS, dead_letter_rows(found)))
            else:
                emit(f"no dead letters in {ctx.where}")
            return OK
        assert letter_id is not None
        if action == "get":
            letter = await within(ctx, transport.durable.dead_letter(letter_id), "reading a dead letter")
            if letter is None:
                raise Exit(FAILED, f"no dead letter {letter_id!r} in {ctx.where}")
            show_letter(ctx, *letter)
            return OK
        done = letters.replay if action == "replay" else letters.discard
        if not await within(ctx, done(letter_id), f"{action} of a dead letter"):
            raise Exit(FAILED, f"no dead letter {letter_id!r} in {ctx.where}")
    past = "replayed" if action == "replay" else "discarded"
    emit(dumps({past: letter_id}) if ctx.as_json else f"{past} {letter_id}")
    return OK


def show_letter(ctx: Context, letter: DeadLetter, envelope: Envelope) -> None:
    """A dead letter's fields, and the message it holds (its JSON body)."""
    try:
        body: Any = json.loads(envelope.body)
    except ValueError:
        body = envelope.body.decode(errors="replace")
    record = {**letter.model_dump(mode="json"), "body": body}
    shown = [
        (name, value if isinstance(value, str) else dumps(value, indent=None))
        for name, value in record.items()
    ]
    emit(dumps(record) if ctx.as_json else fields(shown))
