"""A durable send while its broker is frozen (SIGSTOP), on real servers: it ends by its deadline."""

from __future__ import annotations

import time
from typing import ClassVar

import pytest

from fastapi_catga import CatgaSettings, Command, Durable, RequestTimeoutError, build, handler
from tests.servers import NatsServer, RedisServer


class Settle(Command[str]):
    durable: ClassVar[Durable | bool] = Durable(lease=5)


@handler
async def settle(command: Settle) -> str:
    return "settled"


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
        assert await catga.mediator.send(Settle(), timeout=10) == "settled"
        server.pause()
        started = time.monotonic()
        with pytest.raises(RequestTimeoutError, match="may or may not be stored"):
            await catga.mediator.send(Settle(), timeout=1)
        assert time.monotonic() - started < 1.5, "the send outlived its deadline"
        server.resume()
        assert await catga.mediator.send(Settle(), timeout=10) == "settled"
    finally:
        server.resume()
        await catga.stop()
