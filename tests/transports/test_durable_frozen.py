"""A durable send on real servers ends by its deadline, with an error that says whether the command
was stored: its broker frozen (SIGSTOP), or its handler slower than the deadline."""

from __future__ import annotations

import asyncio
import time
from typing import ClassVar

import pytest
from pydantic import BaseModel, Field

from fastapi_catga import CatgaSettings, Command, Durable, RequestTimeoutError, build, handler
from tests.servers import NatsServer, RedisServer


class Account(BaseModel):
    user_id: int = Field(alias="userId")


class Settle(Command[Account]):
    durable: ClassVar[Durable | bool] = Durable(lease=5)
    seconds: float = 0.0


@handler
async def settle(command: Settle) -> Account:
    await asyncio.sleep(command.seconds)
    return Account(userId=7)  # written by alias, as every result is


@pytest.mark.parametrize(
    "broker", [pytest.param("nats", marks=pytest.mark.nats), pytest.param("redis", marks=pytest.mark.redis)]
)
async def test_a_durable_send_to_a_frozen_broker_ends_by_its_deadline(
    broker: str, request: pytest.FixtureRequest
) -> None:
    server: NatsServer | RedisServer = request.getfixturevalue(f"{broker}_server")
    url = {"nats_url": server.url} if broker == "nats" else {"redis_url": server.url}
    catga = build(CatgaSettings(transport=broker, cluster="frozen", **url), handlers=[settle])  # type: ignore[arg-type]
    await catga.start()
    try:
        assert await catga.mediator.send(Settle(), timeout=10) == Account(userId=7)
        with pytest.raises(RequestTimeoutError, match="accepted and still runs") as slow:
            await catga.mediator.send(Settle(seconds=3), timeout=1)
        assert slow.value.details is not None and slow.value.details["accepted"] is True
        server.pause()
        started = time.monotonic()
        with pytest.raises(RequestTimeoutError, match="may or may not be stored"):
            await catga.mediator.send(Settle(), timeout=1)
        assert time.monotonic() - started < 1.5, "the send outlived its deadline"
        server.resume()
        assert await catga.mediator.send(Settle(), timeout=10) == Account(userId=7)
    finally:
        server.resume()
        await catga.stop()


@pytest.mark.parametrize(
    "broker", [pytest.param("nats", marks=pytest.mark.nats), pytest.param("redis", marks=pytest.mark.redis)]
)
async def test_a_node_stops_within_the_documented_bound_while_its_broker_is_frozen(
    broker: str, request: pytest.FixtureRequest
) -> None:
    """docs/deployment.md: deregister 2 s, unsubscribes 1 s, the drain, outcomes' unsubscribe 1 s,
    close 4 s. Unsubscribes that waited for a frozen Redis's confirmation took 5 s and 3.7 s more."""
    server: NatsServer | RedisServer = request.getfixturevalue(f"{broker}_server")
    url = {"nats_url": server.url} if broker == "nats" else {"redis_url": server.url}
    settings = CatgaSettings(transport=broker, cluster="frozen-stop", drain_timeout=0, **url)  # type: ignore[arg-type]
    catga = build(settings, handlers=[settle])
    await catga.start()
    server.pause()
    try:
        started = time.monotonic()
        await catga.stop()
        took = time.monotonic() - started
    finally:
        server.resume()
    assert took < 2 + 1 + 1 + 4 + 1, f"stopping took {took:.1f} s"  # and a second for a loaded box
