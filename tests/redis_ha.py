"""Highly available Redis for integration tests, real processes on loopback: a primary, a replica
and three Sentinels (`sentinel_setup`), or a Redis Cluster of three primaries (`redis_cluster`);
either one over TLS with passwords (`HaSecurity`)."""

from __future__ import annotations

import functools
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from tests.secure import Pki, TlsRedisServer, tls_answers
from tests.servers import RedisServer, ServerProcess, find_binary, free_port, port_is_bindable, probe_line

__all__ = ["MASTER", "HaSecurity", "SentinelServer", "SentinelSetup", "redis_cluster", "sentinel_setup"]

MASTER = "catga-primary"
#: Sentinel timings for tests: a primary is down after 1 s without an answer.
DOWN_AFTER_MS = 1000


@dataclass(frozen=True)
class HaSecurity:
    """TLS on every port, with client certificates asked for everywhere (replicas, Sentinels and
    cluster nodes show ``pki.client_cert`` to each other), a password on the Redis servers, and
    another one on the Sentinels."""

    pki: Pki
    password: str
    sentinel_password: str

    def server_args(self) -> list[str]:
        pki = self.pki
        return [
            *("--requirepass", self.password, "--masterauth", self.password),
            *("--tls-replication", "yes", "--tls-cluster", "yes"),
            *("--tls-client-cert-file", pki.client_cert, "--tls-client-key-file", pki.client_key),
        ]

    def sentinel_conf(self) -> str:
        pki = self.pki
        return (
            f"tls-cert-file {pki.server_cert}\ntls-key-file {pki.server_key}\ntls-ca-cert-file {pki.ca}\n"
            f"tls-client-cert-file {pki.client_cert}\ntls-client-key-file {pki.client_key}\n"
            f"tls-auth-clients yes\ntls-replication yes\nrequirepass {self.sentinel_password}\n"
            f"sentinel auth-pass {MASTER} {self.password}\n"
        )

    def client(self, *, sentinel: bool = False) -> dict[str, Any]:
        """redis-py's options for a Redis server, or for a Sentinel."""
        pki = self.pki
        return {
            "ssl": True,
            "ssl_ca_certs": pki.ca,
            "ssl_certfile": pki.client_cert,
            "ssl_keyfile": pki.client_key,
            "password": self.sentinel_password if sentinel else self.password,
        }


class SentinelServer(ServerProcess):
    """``redis-server <conf> --sentinel`` watching the primary on ``primary_port`` (over TLS, and
    asking for a password, with ``security``)."""

    name = "redis-server"
    env_var = "REDIS_SERVER_BIN"

    def __init__(
        self, primary_port: int, binary: str | None = None, security: HaSecurity | None = None
    ) -> None:
        super().__init__(binary)
        self.primary_port = primary_port
        self.security = security
        self.conf = self.data_dir / "sentinel.conf"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        if not self.conf.exists():  # Sentinel rewrites its file: a restart keeps what it learnt
            ports = f"port 0\ntls-port {self.port}\n" if self.security else f"port {self.port}\n"
            self.conf.write_text(
                f"{ports}bind 127.0.0.1\ndaemonize no\ndir {self.data_dir}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {MASTER} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
                f"sentinel parallel-syncs {MASTER} 1\n"
                + (self.security.sentinel_conf() if self.security else "")
            )
        return [self.binary, str(self.conf), "--sentinel"]

    def answers(self, timeout: float = 0.5) -> bool:
        if self.security:
            return tls_answers(self.security.pki, self.port, timeout)
        return probe_line(self.port, b"PING\r\n", b"+PONG", timeout)


@dataclass
class SentinelSetup:
    primary: RedisServer
    replica: RedisServer
    sentinels: list[SentinelServer]
    security: HaSecurity | None = None

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"{'rediss' if self.security else 'redis'}+sentinel://{hosts}/{MASTER}/0"

    def master_port(self) -> int | None:
        """The master's port as the first Sentinel that answers says, or None if none does."""
        for sentinel in self.sentinels:
            if sentinel.running:
                with redis.Redis(
                    port=sentinel.port, socket_timeout=1, **_client(self.security, True)
                ) as client:
                    address = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
                return int(address[1])
        return None

    def close(self) -> None:
        for server in [*self.sentinels, self.replica, self.primary]:
            server.close()


def sentinel_setup(binary: str | None = None, security: HaSecurity | None = None) -> SentinelSetup:
    """Start a primary, a replica of it and three Sentinels; return once a failover could happen:
    the replica is in sync, and each Sentinel knows the replica and the two other Sentinels.

    With ``security``, every one of them on Debian's redis-server 7.0 (built with TLS)."""
    primary = _server(binary, security).start()
    replica = _server(binary, security, ["--replicaof", "127.0.0.1", str(primary.port)]).start()
    setup = SentinelSetup(primary, replica, [], security)
    try:
        _wait(
            lambda: _info(replica.port, "replication", security).get("master_link_status") == "up",
            20,
            "replica in sync",
        )
        sentinel_binary = binary if security is None else primary.binary
        setup.sentinels = [SentinelServer(primary.port, sentinel_binary, security).start() for _ in range(3)]
        for sentinel in setup.sentinels:
            ready = functools.partial(_knows_everyone, sentinel.port, security)
            _wait(ready, 30, f"sentinel {sentinel.port} ready")
    except BaseException:
        setup.close()
        raise
    return setup


def _server(
    binary: str | None, security: HaSecurity | None, args: list[str] | None = None, port: int | None = None
) -> RedisServer:
    if security is None:
        return RedisServer(binary, port=port, extra_args=args or [])
    return TlsRedisServer(security.pki, port=port, extra_args=[*security.server_args(), *(args or [])])


def _client(security: HaSecurity | None, sentinel: bool = False) -> dict[str, Any]:
    return {} if security is None else security.client(sentinel=sentinel)


def _knows_everyone(port: int, security: HaSecurity | None = None) -> bool:
    with redis.Redis(port=port, socket_timeout=1, **_client(security, True)) as client:
        replicas = client.execute_command("SENTINEL", "REPLICAS", MASTER)
        sentinels = client.execute_command("SENTINEL", "SENTINELS", MASTER)
    return len(replicas) == 1 and len(sentinels) == 2


def redis_cluster(
    binary: str, primaries: int = 3, replicas: int = 0, security: HaSecurity | None = None
) -> list[RedisServer]:
    """Start ``primaries`` cluster-enabled servers, each with ``replicas`` replicas, and join them
    (``redis-cli --cluster create``, every slot assigned); return once each one says
    ``cluster_state:ok`` and every replica is in sync. The primaries come first in the list.

    With ``security``, on Debian's redis-server 7.0 (built with TLS), whatever ``binary`` says."""
    options = [
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-node-timeout",
        "2000",
    ]
    servers = [
        _server(binary, security, options, port=_cluster_port()).start()
        for _ in range(primaries * (1 + replicas))
    ]
    try:
        cli = _cli(servers[0].binary)
        addresses = [f"127.0.0.1:{server.port}" for server in servers]
        secure: list[str] = []
        if security is not None:
            pki = security.pki
            secure = ["--tls", "--cacert", pki.ca, "--cert", pki.client_cert, "--key", pki.client_key]
            secure += ["--no-auth-warning", "-a", security.password]
        done = subprocess.run(
            [
                cli,
                *secure,
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}\n{done.stderr}")
        for server in servers:
            _wait(functools.partial(_cluster_ok, server.port, security), 30, f"cluster node {server.port} ok")
        for server in servers[primaries:]:
            _wait(functools.partial(_in_sync, server.port, security), 30, f"replica {server.port} in sync")
    except BaseException:
        for server in servers:
            server.close()
        raise
    return servers


def _in_sync(port: int, security: HaSecurity | None = None) -> bool:
    return _info(port, "replication", security).get("master_link_status") == "up"


def _cluster_ok(port: int, security: HaSecurity | None = None) -> bool:
    return _info(port, "cluster", security).get("cluster_state") == "ok"


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


def _info(port: int, section: str, security: HaSecurity | None = None) -> dict[str, Any]:
    """``INFO <section>`` (or ``CLUSTER INFO``) as a dict."""
    with redis.Redis(port=port, socket_timeout=1, decode_responses=True, **_client(security)) as client:
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
