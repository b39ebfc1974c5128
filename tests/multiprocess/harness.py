"""Run app nodes as real uvicorn processes, and break them (kill -9, SIGSTOP, SIGTERM)."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from tests.polling import wait_until
from tests.servers import free_port

APP = "tests.multiprocess.app:app"
ROOT = Path(__file__).resolve().parents[2]
#: Short timings (heartbeat 1 s, TTL 3 s) so failures show within seconds.
SHORT = {
    "CATGA_HEARTBEAT_INTERVAL": "1",
    "CATGA_NODE_TTL": "3",
    "CATGA_REQUEST_TIMEOUT": "3",
    "CATGA_RETRY_ATTEMPTS": "3",
    "CATGA_DRAIN_TIMEOUT": "2",
}
_running: set[AppNode] = set()


class AppNode:
    """One app process on a free port."""

    def __init__(self, node_id: str, env: dict[str, str], app: str = APP) -> None:
        self.node_id = node_id
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            **SHORT,
            **env,
            "CATGA_NODE_ID": node_id,
            "CATGA_ENDPOINT": self.url,
            "CATGA_METADATA": f'{{"role": "test", "name": "{node_id}"}}',
        }
        self.app = app
        self.log = Path(tempfile.mkdtemp(prefix="catga-node-")) / f"{node_id}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def start(self, *, wait: bool = True) -> AppNode:
        command = [sys.executable, "-m", "uvicorn", self.app, "--port", str(self.port), "--no-access-log"]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        _running.add(self)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, within: float = 20) -> None:
        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"node {self.node_id} exited:\n{self.log_tail()}")
            return self.client.get("/catga/health").status_code == 200

        wait_until(
            ready, within=within, interval=0.05, ignore=(httpx.HTTPError,), message=f"{self.node_id} ready"
        )

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def get(self, path: str, **kwargs: Any) -> Any:
        response = self.client.get(path, **kwargs)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.post(path, **kwargs)

    def view(self) -> set[str]:
        return {node["node_id"] for node in self.get("/catga/nodes")}

    def signal(self, sig: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill(self) -> None:
        """``kill -9``: no goodbye."""
        self.signal(signal.SIGKILL)
        self._reap()

    def terminate(self) -> None:
        """Graceful stop (what a process manager sends), waiting for the exit."""
        self.signal(signal.SIGTERM)
        self._reap()

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def _reap(self, timeout: float = 15) -> None:
        assert self.process is not None
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        _running.discard(self)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.resume()
            self.kill()
        _running.discard(self)
        self.client.close()


@atexit.register
def _kill_leftovers() -> None:
    for node in list(_running):
        node.close()
