"""The CLI runs as a subprocess (``python -m fastapi_catga``) against real brokers, beside real nodes
started in the test process (their event loop keeps running while the CLI talks to them)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import coverage
import pytest

from fastapi_catga import Catga, CatgaSettings, build
from tests.cli import handlers
from tests.cli.handlers import NodeTag, charged, rejecting
from tests.polling import finishes
from tests.servers import ServerProcess

#: Short membership timings, given to the nodes and the CLI alike (the same CATGA_* settings).
TIMINGS = {"CATGA_HEARTBEAT_INTERVAL": "0.5", "CATGA_NODE_TTL": "2"}


@dataclass
class Broker:
    kind: str
    server: ServerProcess
    cluster: str = "clitest"

    @property
    def env(self) -> dict[str, str]:
        """The CLI's environment: the same CATGA_* variables the nodes get."""
        url = "CATGA_REDIS_URL" if self.kind == "redis" else "CATGA_NATS_URL"
        return {"CATGA_TRANSPORT": self.kind, url: self.server.url, "CATGA_CLUSTER": self.cluster, **TIMINGS}

    def settings(self, node_id: str) -> CatgaSettings:
        url = "redis_url" if self.kind == "redis" else "nats_url"
        return CatgaSettings.model_validate(
            {
                "transport": self.kind,
                url: self.server.url,
                "cluster": self.cluster,
                "node_id": node_id,
                "endpoint": f"http://{node_id}.test:8000",
                "heartbeat_interval": 0.5,
                "node_ttl": 2,
                "request_timeout": 5,
            }
        )


@pytest.fixture(
    params=[pytest.param("nats", marks=pytest.mark.nats), pytest.param("redis", marks=pytest.mark.redis)]
)
def broker(request: pytest.FixtureRequest) -> Broker:
    server: ServerProcess = request.getfixturevalue(f"{request.param}_server")
    return Broker(request.param, server)


@pytest.fixture(autouse=True)
def fresh_ledgers() -> Iterator[None]:
    rejecting.clear()
    charged.clear()
    yield


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def cli_env(env: dict[str, str]) -> dict[str, str]:
    """This process's environment without its CATGA_* variables, plus ``env``.

    Under ``pytest --cov`` the CLI's process measures itself too: coverage starts in it from the
    serialized configuration (parallel data files, which pytest-cov combines at the end).
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith("CATGA_")}
    measuring = coverage.Coverage.current()
    if measuring is not None:
        base["COVERAGE_PROCESS_CONFIG"] = measuring.config.serialize()
    return {**base, **env}


async def spawn(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fastapi_catga",
        *args,
        env=cli_env(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def catga(*args: str, env: dict[str, str], within: float = 60) -> Result:
    """Run the CLI to its end; the test's nodes keep serving meanwhile."""
    process = await spawn(*args, env=env)
    out, err = await asyncio.wait_for(process.communicate(), within)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


class Nodes:
    """Nodes in this process on the test's broker."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker
        self.up: dict[str, Catga] = {}

    async def start(self, name: str) -> Catga:
        node = build(self._broker.settings(name), handlers=[handlers], behaviors=[NodeTag(name)])
        await finishes(node.start(), within=30, what=f"starting node {name}")
        self.up[name] = node
        return node

    async def stop(self, name: str) -> None:
        await finishes(self.up.pop(name).stop(), within=30, what=f"stopping node {name}")


@pytest.fixture
async def nodes(broker: Broker) -> AsyncIterator[Nodes]:
    """Start nodes with ``await nodes.start(name)``; every node still up is stopped after the test."""
    made = Nodes(broker)
    yield made
    for name in list(made.up):
        await made.stop(name)


@dataclass
class Lines:
    """The stdout of a running CLI, read line by line."""

    process: asyncio.subprocess.Process
    seen: list[str] = field(default_factory=list)

    async def interrupt(self) -> int:
        """Ctrl-C, if it still runs; its exit code."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGINT)
        return await asyncio.wait_for(self.process.wait(), 30)

    async def until(self, match: Callable[[str], bool], within: float = 15) -> str:
        """Read lines until one matches; return it."""
        assert self.process.stdout is not None
        async with asyncio.timeout(within):
            while True:
                line = (await self.process.stdout.readline()).decode()
                if not line:
                    assert self.process.stderr is not None
                    err = (await self.process.stderr.read()).decode()
                    raise AssertionError(
                        f"the CLI ended before a matching line; it printed {self.seen}, {err}"
                    )
                self.seen.append(line.rstrip("\n"))
                if match(line):
                    return line
