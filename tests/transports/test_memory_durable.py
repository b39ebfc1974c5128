"""The in-memory durable store passes the durable contract."""

from __future__ import annotations

import pytest

from fastapi_catga.testing import InMemoryBroker, InMemoryTransport
from fastapi_catga.transports.durable import DurableStore
from tests.transports.durable_contract import DurableContract, MakeStore


class TestMemoryDurable(DurableContract):
    @pytest.fixture
    def make_store(self) -> MakeStore:
        broker = InMemoryBroker()

        async def make() -> DurableStore:
            transport = InMemoryTransport(broker, cluster="durable")
            await transport.connect()
            return transport.durable

        return make
