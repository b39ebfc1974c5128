"""Highly available Redis for integration tests, real processes on loopback: a primary, a replica
and three Sentinels (`sentinel_setup`), or a Redis Cluster of three primaries (`redis_cluster`)."""

from __future__ import annotations

import functools
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from tests.servers import RedisServer, ServerProcess, find_binary, free_port, port_is_bindable, probe_line

__all__ = ["MASTER", "SentinelServer", "SentinelSetup", "redis_cluster", "sentinel_setup"]

MASTER = "catga-primary"
#: Sentinel timings for tests: a primary is down after 1 s without an answer.
DOWN_AFTER_MS = 1000


class SentinelServer(ServerProcess):
    """``redis-server <conf> --sentinel`` watching the primary on ``primary_port``."""

    name = "redis-server"
    env_var = "REDIS_SERVER_BIN"

    def __init__(self, primary_port: int, binary: str | None = None) -> None:
        super().__init__(binary)
        self.primary_port = primary_port
        self.conf = self.data_dir / "sentinel.conf"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if not self.conf.exists():  # Sentinel rewrites its file: a restart keeps what it learnt
            self.conf.write_text(
                f"port {self.port}\nbind 127.0.0.1\ndaemonize no\ndir {self.data_dir}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
            )
        return [self.binary, str(self.conf), "--sentinel"]

    def answers(self, timeout: float = 0.5) -> bool:
        return probe_line(self.port, b"PING\r\n", b"+PONG", timeout)


@dataclass
class SentinelSetup:
    primary: RedisServer
    replica: RedisServer
    sentinels: list[SentinelServer]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER}/0"

    def master_port(self) -> int | None:
        """The master's port as the first Sentinel that answers says, or None if none does."""
        for sentinel in self.sentinels:
            if sentinel.running:
                with redis.Redis(port=sentinel.port, socket_timeout=1) as client:
                    address = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
                return int(address[1])
        return None

    def close(self) -> None:
        for server in [*self.sentinels, self.replica, self.primary]:
            server.close()


def sentinel_setup(binary: str | None = None) -> SentinelSetup:
    """Start a primary, a replica of it and three Sentinels; return once a failover could happen:
    the replica is in sync, and each Sentinel knows the replica and the two other Sentinels."""
    primary = RedisServer(binary).start()
    replica = RedisServer(binary, extra_args=["--replicaof", "127.0.0.1", str(primary.port)]).start()
    setup = SentinelSetup(primary, replica, [])
    try:
        _wait(
            lambda: _info(replica.port, "replication").get("master_link_status") == "up",
            20,
            "replica in sync",
        )
        setup.sentinels = [SentinelServer(primary.port, binary).start() for _ in range(3)]
        for sentinel in setup.sentinels:
            _wait(functools.partial(_knows_everyone, sentinel.port), 30, f"sentinel {sentinel.port} ready")
    except BaseException:
        setup.close()
        raise
    return setup


def _knows_everyone(port: int) -> bool:
    with redis.Redis(port=port, socket_timeout=1) as client:
        replicas = client.execute_command("SENTINEL", "REPLICAS", MASTER)
        sentinels = client.execute_command("SENTINEL", "SENTINELS", MASTER)
    return len(replicas) == 1 and len(sentinels) == 2


def redis_cluster(binary: str, primaries: int = 3, replicas: int = 0) -> list[RedisServer]:
    """Start ``primaries`` cluster-enabled servers, each with ``replicas`` replicas, and join them
    (``redis-cli --cluster create``, every slot assigned); return once each one says
    ``cluster_state:ok`` and every replica is in sync. The primaries come first in the list."""
    options = [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        "2000",
    ]
    servers = [
        RedisServer(binary, port=_cluster_port(), extra_args=options).start()
        for _ in range(primaries * (1 + replicas))
    ]
    try:
        cli = _cli(binary)
        addresses = [f"127.0.0.1:{server.port}" for server in servers]
        done = subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", str(replicas), "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}\n{done.stderr}")
        for server in servers:
            _wait(functools.partial(_cluster_ok, server.port), 30, f"cluster node {server.port} ok")
        for server in servers[primaries:]:
            _wait(functools.partial(_in_sync, server.port), 30, f"replica {server.port} in sync")
    except BaseException:
        for server in servers:
            server.close()
        raise
    return servers


def _in_sync(port: int) -> bool:
    return _info(port, "replication").get("master_link_status") == "up"


def _cluster_ok(port: int) -> bool:
    return _info(port, "cluster").get("cluster_state") == "ok"


def _cluster_port() -> int:
    """A free port whose cluster bus port (10000 higher, below 65536 on Redis 6.2) is free too."""
    while True:
        port = free_port()
        if port <= 55535 and port_is_bindable(port + 10000):
            return port


def _cli(binary: str) -> str:
    """The redis-cli next to ``binary`` (same version), else the one on the PATH."""
    beside = Path(binary).parent / "redis-cli"
    return str(beside) if beside.exists() else find_binary("redis-cli", "REDIS_CLI_BIN")


def _info(port: int, section: str) -> dict[str, Any]:
    """``INFO <section>`` (or ``CLUSTER INFO``) as a dict."""
    with redis.Redis(port=port, socket_timeout=1, decode_responses=True) as client:
        if section != "cluster":
            return dict(client.info(section))
        text = str(client.execute_command("CLUSTER", "INFO"))
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def _wait(ready: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"not ready within {within} s: {what} (last error: {last!r})")
