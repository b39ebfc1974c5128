from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from fastapi_catga.transports.base import Transport
from fastapi_catga.transports.memory import InMemoryBroker, InMemoryTransport
from tests.transports.contract import Connect, TransportContract


class TestInMemoryTransport(TransportContract):
    @pytest.fixture
    async def connect(self, cluster: str) -> AsyncIterator[Connect]:
        broker = InMemoryBroker()
        made: list[InMemoryTransport] = []

        async def connect() -> Transport:
            transport = InMemoryTransport(broker, cluster=cluster, max_payload=64 * 1024)
            await transport.connect()
            made.append(transport)
            return transport

        yield connect
        for transport in made:
            await transport.aclose()
