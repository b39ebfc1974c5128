"""The real-server fixtures themselves: start, kill/restart on the same port, pause/resume."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.polling import eventually, wait_until
from tests.servers import (
    RESERVED_PORTS,
    NatsServer,
    RedisServer,
    ServerProcess,
    find_binary,
    free_port,
    tcp_accepts,
)


def _refuses(port: int) -> bool:
    return not tcp_accepts(port, timeout=0.2)


def _check_kill_restart(server: ServerProcess) -> None:
    port, data_dir, old_pid = server.port, server.data_dir, server.pid
    server.kill()
    assert not server.running
    wait_until(lambda: _refuses(port), within=2, message=f"port {port} still accepts after kill()")
    server.restart()
    assert (server.port, server.data_dir) == (port, data_dir)
    assert server.pid != old_pid and server.running
    wait_until(server.answers, within=5, message="no answer after restart()")
    server.stop()
    assert not server.running
    wait_until(lambda: _refuses(port), within=2, message=f"port {port} still accepts after stop()")
    server.restart()
    assert server.port == port and server.answers()


def _check_pause_resume(server: ServerProcess) -> None:
    server.pause()
    assert server.paused
    assert tcp_accepts(server.port), "a paused server's listen socket still accepts connections"
    assert not server.answers(timeout=0.3), "paused server answered"
    server.resume()
    wait_until(lambda: server.answers(timeout=0.3), within=5, message="no answer after resume()")


@pytest.mark.nats
def test_nats_starts_and_sends_info(nats_server: NatsServer) -> None:
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    assert nats_server.port not in RESERVED_PORTS
    with socket.create_connection(("127.0.0.1", nats_server.port), timeout=2) as sock:
        assert sock.makefile("rb").readline().startswith(b"INFO ")
    assert nats_server.version_info >= (2, 10)


@pytest.mark.nats
def test_nats_kill_then_restart_on_same_port(nats_server: NatsServer) -> None:
    _check_kill_restart(nats_server)


@pytest.mark.nats
def test_nats_pause_resume(nats_server: NatsServer) -> None:
    _check_pause_resume(nats_server)


@pytest.mark.nats
def test_nats_2_9(nats_server_2_9: NatsServer) -> None:
    assert nats_server_2_9.version.startswith("2.9.")
    assert nats_server_2_9.answers()


@pytest.mark.nats
def test_server_that_exits_fails_loudly_with_its_log() -> None:
    server = NatsServer(extra_args=["--no-such-flag"])
    try:
        with pytest.raises(RuntimeError, match="exited with code") as info:
            server.start()
        assert "no-such-flag" in str(info.value)
    finally:
        server.close()
    assert not server.data_dir.exists()


@pytest.mark.redis
async def test_redis_starts_and_pongs(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    await eventually(redis_server.answers, within=2, message="redis did not PONG")


@pytest.mark.redis
def test_redis_kill_then_restart_on_same_port(redis_server: RedisServer) -> None:
    _check_kill_restart(redis_server)


@pytest.mark.redis
def test_redis_pause_resume(redis_server: RedisServer) -> None:
    _check_pause_resume(redis_server)


def test_find_binary_order_and_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "nats-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("NATS_SERVER_BIN", str(fake))
    assert find_binary("nats-server", "NATS_SERVER_BIN") == str(fake)
    monkeypatch.setenv("NATS_SERVER_BIN", str(tmp_path / "missing"))
    with pytest.raises(RuntimeError, match="NATS_SERVER_BIN"):
        find_binary("nats-server", "NATS_SERVER_BIN")
    monkeypatch.delenv("NATS_SERVER_BIN")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(RuntimeError, match="pip install -e"):
        find_binary("redis-server-that-does-not-exist", "NO_SUCH_BIN")
    assert free_port() not in RESERVED_PORTS


async def test_polling_helpers_time_out_with_message() -> None:
    with pytest.raises(AssertionError, match=r"never true \(still false after 0\.1"):
        await eventually(lambda: False, within=0.1, message="never true")
    with pytest.raises(AssertionError, match="never true"):
        wait_until(lambda: False, within=0.05, message="never true")
    calls = iter([False, False, True])
    assert wait_until(lambda: next(calls), within=1) < 1
