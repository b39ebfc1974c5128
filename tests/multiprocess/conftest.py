from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.multiprocess.harness import AppNode
from tests.servers import NatsServer, RedisServer, ServerProcess


@dataclass
class Broker:
    kind: str
    server: ServerProcess

    @property
    def env(self) -> dict[str, str]:
        url_var = "CATGA_NATS_URL" if self.kind == "nats" else "CATGA_REDIS_URL"
        return {"CATGA_TRANSPORT": self.kind, url_var: self.server.url}


def _start_broker(kind: str) -> ServerProcess:
    return (NatsServer() if kind == "nats" else RedisServer()).start()


@pytest.fixture(
    params=[pytest.param("nats", marks=pytest.mark.nats), pytest.param("redis", marks=pytest.mark.redis)]
)
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    server = _start_broker(request.param)
    try:
        yield Broker(request.param, server)
    finally:
        server.close()


StartNodes = Callable[..., list[AppNode]]


@pytest.fixture
def start_nodes(broker: Broker) -> Iterator[StartNodes]:
    """Start app processes in parallel and wait until each serves; all are stopped after the test."""
    made: list[AppNode] = []

    def start(*names: str, env: dict[str, str] | None = None) -> list[AppNode]:
        nodes = [AppNode(name, {**broker.env, **(env or {})}) for name in names]
        for node in nodes:
            node.start(wait=False)
        made.extend(nodes)
        for node in nodes:
            node.wait_ready()
        return nodes

    yield start
    for node in made:
        node.close()
