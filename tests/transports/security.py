"""What the NATS and Redis security tests share: a query to round-trip, two nodes that must meet,
and the check that a refused node fails at start-up, fast, without showing its secret."""

from __future__ import annotations

import logging
import time
from typing import Any, ClassVar

import pytest

from fastapi_catga import CatgaError, CatgaSettings, Command, Durable, Query, build, handler
from fastapi_catga.exceptions import ConfigurationError, TransportError
from tests.polling import eventually


class Ping(Query[str]):
    text: str


class Note(Command[None]):
    """Durable: its queue, lease and done record need the broker's streams (JetStream, Redis Streams)
    and the rights to them."""

    durable: ClassVar[Durable | bool] = Durable(attempts=2, backoff=(0.2,), lease=5, dedup_window=60)
    text: str


noted: list[str] = []


@handler
async def pong(query: Ping) -> str:
    return f"pong {query.text}"


@handler
async def note(command: Note) -> None:
    noted.append(command.text)


def settings(cluster: str, node_id: str, fields: dict[str, Any]) -> CatgaSettings:
    return CatgaSettings.model_validate(
        {
            "cluster": cluster,
            "node_id": node_id,
            "heartbeat_interval": 0.5,
            "node_ttl": 3,
            "request_timeout": 10,
            **fields,
        }
    )


async def join_and_round_trip(cluster: str, fields: dict[str, Any]) -> None:
    """Two nodes with these settings meet through the broker, a send crosses from one to the other,
    and a durable command is stored and run."""
    server_side = build(settings(cluster, "b", fields), handlers=[pong, note])
    client_side = build(settings(cluster, "a", fields), handlers=[])
    await server_side.start()
    try:
        await client_side.start()  # the view is complete once start returns
        try:
            assert client_side.node.view.get("b") is not None, "node a did not see node b join"
            assert await client_side.mediator.send(Ping(text="over the wire")) == "pong over the wire"
            await client_side.mediator.enqueue(Note(text=cluster))
            await eventually(lambda: cluster in noted, within=10, message="the durable command never ran")
        finally:
            await client_side.stop()
    finally:
        await server_side.stop()


async def refused_at_start(
    cluster: str,
    fields: dict[str, Any],
    secrets: list[str],
    caplog: pytest.LogCaptureFixture,
    *,
    within: float,
) -> CatgaError:
    """Start a node that the broker refuses: it fails within ``within`` s with a clear error, and no
    secret shows in the error or in any log line."""
    caplog.set_level(logging.DEBUG)
    node = build(settings(cluster, "refused", fields), handlers=[pong])
    started = time.monotonic()
    with pytest.raises((TransportError, ConfigurationError)) as raised:
        await node.start()
    elapsed = time.monotonic() - started
    assert elapsed < within, f"start-up took {elapsed:.1f} s to fail: the refusal should end it at once"
    cause = raised.value.__cause__
    shown = f"{raised.value}\n{raised.value!r}\n{cause!r}\n{caplog.text}"
    for secret in secrets:
        assert secret not in shown, f"a secret shows: {shown}"
    return raised.value
