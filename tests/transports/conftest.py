"""Fixtures the transport tests share."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from fastapi_catga.transports.nats import NatsTransport

OpenNats = Callable[..., Awaitable[NatsTransport]]


@pytest.fixture
def cluster() -> str:
    """A cluster name of the test's own: tests sharing a server never see each other."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def open_nats(cluster: str) -> AsyncIterator[OpenNats]:
    """Connects NatsTransports (the test's cluster name unless given) and closes them afterwards."""
    made: list[NatsTransport] = []

    async def open_nats(servers: str, **options: Any) -> NatsTransport:
        transport = NatsTransport(servers, **{"cluster": cluster, **options})
        made.append(transport)
        await transport.connect()
        return transport

    yield open_nats
    for transport in made:
        await transport.aclose()
