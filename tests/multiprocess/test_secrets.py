"""A broker password never shows: not in answers, not in problem details, not in any log line.

Brokers run with a password (nats-server --user/--pass, redis-server --requirepass); a node joins
with it, then the broker dies and every answer and log line is searched for it.
"""

from __future__ import annotations

import pytest

from tests.multiprocess.harness import AppNode
from tests.polling import wait_until
from tests.servers import NatsServer, RedisServer, ServerProcess, probe_line

pytestmark = pytest.mark.multiprocess
PASSWORD = "Pw-5ecret-1d"


class AuthRedisServer(RedisServer):
    def answers(self, timeout: float = 0.5) -> bool:
        return probe_line(self.port, f"AUTH {PASSWORD}\r\n".encode(), b"+OK", timeout)


def _broker(kind: str) -> tuple[ServerProcess, dict[str, str], dict[str, str]]:
    """The server, the env of a node with the right password, and of one with a wrong one."""
    if kind == "nats":
        server: ServerProcess = NatsServer(extra_args=["--user", "catga", "--pass", PASSWORD]).start()
        url = f"nats://catga:{PASSWORD}@127.0.0.1:{server.port}"
        env = {"CATGA_TRANSPORT": "nats", "CATGA_NATS_URL": url}
        wrong = {**env, "CATGA_NATS_URL": url.replace(PASSWORD, "Wr0ng-" + PASSWORD)}
    else:
        server = AuthRedisServer(extra_args=["--requirepass", PASSWORD]).start()
        url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"
        env = {"CATGA_TRANSPORT": "redis", "CATGA_REDIS_URL": url}
        wrong = {**env, "CATGA_REDIS_URL": url.replace(PASSWORD, "Wr0ng-" + PASSWORD)}
    return server, env, wrong


@pytest.mark.parametrize(
    "kind", [pytest.param("nats", marks=pytest.mark.nats), pytest.param("redis", marks=pytest.mark.redis)]
)
def test_no_answer_and_no_log_line_shows_the_broker_password(kind: str) -> None:
    server, env, wrong_env = _broker(kind)
    node = AppNode("a", env)
    refused = AppNode("b", {**wrong_env, "CATGA_REQUEST_TIMEOUT": "1"})
    try:
        node.start()
        assert node.post("/work").status_code == 200
        refused.start(wait=False)
        assert refused.process is not None
        assert refused.process.wait(timeout=30) != 0, "a wrong password stops the node at start-up"
        refused_log = refused.log.read_text(errors="replace")
        assert "TransportError" in refused_log or "ConfigurationError" in refused_log, refused_log[-1500:]
        server.kill()
        wait_until(lambda: node.client.get("/catga/health").status_code == 503, within=15, message="503")
        answers = [
            node.client.get("/catga/health"),
            node.client.get("/catga/nodes"),
            node.client.post("/work"),
            node.client.post("/work/nobody"),
            node.client.post("/broadcast"),
        ]
        assert answers[3].status_code == 503  # a problem+json answer naming what failed
        shown = "\n".join(a.text for a in answers) + node.log.read_text(errors="replace") + refused_log
        assert PASSWORD not in shown
        assert "***" in shown or "127.0.0.1" in shown  # the broker is named, its secret masked
    finally:
        node.close()
        refused.close()
        server.close()
