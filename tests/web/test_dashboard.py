"""The dashboard in a real browser: headless Chromium (Debian's, driven by Playwright) watches a
three-node cluster over a real nats-server, sees a node killed grey out and go, and counts rise."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page

from tests.browser import chromium_page, handled, shown_nodes
from tests.multiprocess.harness import AppNode
from tests.polling import wait_until
from tests.servers import NatsServer

pytestmark = [pytest.mark.multiprocess, pytest.mark.nats]

APP = "tests.multiprocess.dashboard_app:app"


@pytest.fixture
def page() -> Iterator[Page]:
    with chromium_page() as page:
        yield page


@pytest.fixture
def cluster(nats_server: NatsServer) -> Iterator[dict[str, AppNode]]:
    env = {"CATGA_TRANSPORT": "nats", "CATGA_NATS_URL": nats_server.url}
    nodes = {name: AppNode(name, env, app=APP) for name in "abc"}
    try:
        for node in nodes.values():
            node.start(wait=False)
        for node in nodes.values():
            node.wait_ready()
        yield nodes
    finally:
        for node in nodes.values():
            node.close()


def test_the_dashboard_follows_the_cluster(page: Page, cluster: dict[str, AppNode], tmp_path: Path) -> None:
    a, c = cluster["a"], cluster["c"]
    page.goto(f"{a.url}/catga/dashboard")
    wait_until(lambda: shown_nodes(page) == dict.fromkeys("abc", False), within=15, message="a, b, c shown")
    assert "nats connected" in page.locator("#status").inner_text()
    for _ in range(3):
        assert a.post("/work/a").json() == {"node": "a"}
    wait_until(lambda: handled(page, "Work") == 3, within=5, message="Work counted on a")
    page.screenshot(path=tmp_path / "three-nodes.png")

    c.kill()
    # Evicted within the TTL (3 s) + 1 s, then greyed out for 5 s, then gone from the page.
    wait_until(lambda: shown_nodes(page).get("c") is True, within=10, message="c greyed out")
    assert shown_nodes(page) == {"a": False, "b": False, "c": True}
    page.screenshot(path=tmp_path / "c-gone.png")
    wait_until(lambda: shown_nodes(page) == {"a": False, "b": False}, within=10, message="c removed")

    for _ in range(5):
        assert a.post("/work/a").json() == {"node": "a"}
    assert a.post("/work/b").json() == {"node": "b"}  # runs on b: not counted on a
    wait_until(lambda: handled(page, "Work") == 8, within=5, message="Work count rises on a")
    page.screenshot(path=tmp_path / "dashboard.png")
    assert (tmp_path / "dashboard.png").stat().st_size > 0
