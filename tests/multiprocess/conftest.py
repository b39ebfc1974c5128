from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.multiprocess.harness import APP, AppNode
from tests.servers import NatsServer, RedisServer, ServerProcess, debian_nats_2_9_binary


@dataclass
class Broker:
    kind: str
    server: ServerProcess

    @property
    def env(self) -> dict[str, str]:
        if self.kind == "redis":
            return {"CATGA_TRANSPORT": "redis", "CATGA_REDIS_URL": self.server.url}
        return {"CATGA_TRANSPORT": "nats", "CATGA_NATS_URL": self.server.url}


def _start_broker(kind: str) -> ServerProcess:
    if kind == "redis":
        return RedisServer().start()
    # nats-2.9 is Debian's server, which ignores per-key TTL and sends no expiry markers.
    return NatsServer(debian_nats_2_9_binary() if kind == "nats-2.9" else None).start()


@pytest.fixture(
    params=[
        pytest.param("nats", marks=pytest.mark.nats),
        pytest.param("nats-2.9", marks=pytest.mark.nats),
        pytest.param("redis", marks=pytest.mark.redis),
    ]
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

    def start(*names: str, env: dict[str, str] | None = None, app: str = APP) -> list[AppNode]:
        nodes = [AppNode(name, {**broker.env, **(env or {})}, app=app) for name in names]
        for node in nodes:
            node.start(wait=False)
        made.extend(nodes)
        for node in nodes:
            node.wait_ready()
        return nodes

    yield start
    for node in made:
        node.close()
