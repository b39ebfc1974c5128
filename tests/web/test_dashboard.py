"""The dashboard in a real browser: headless Chromium (Debian's, driven by Playwright) watches a
three-node cluster over a real nats-server, sees a node killed grey out and go, and counts rise."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

from tests.multiprocess.harness import AppNode
from tests.polling import wait_until
from tests.servers import NatsServer

pytestmark = [pytest.mark.multiprocess, pytest.mark.nats]

CHROMIUM = "/usr/bin/chromium"
APP = "tests.multiprocess.dashboard_app:app"


@pytest.fixture
def page() -> Iterator[Page]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run .ci/run, which installs Debian's chromium")
    with sync_playwright() as playwright:
        # Never `playwright install`: the browser is the system's, nothing downloads one.
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 720})
        finally:
            browser.close()


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


def shown_nodes(page: Page) -> dict[str, bool]:
    """Node id -> greyed out, as the nodes table shows them now (read in one go: the page
    redraws its tables every second)."""
    rows: list[list[object]] = page.eval_on_selector_all(
        "#nodes tbody tr", "rows => rows.map(r => [r.dataset.node, r.classList.contains('gone')])"
    )
    return {str(node): bool(gone) for node, gone in rows}


def handled(page: Page, type_name: str) -> int:
    """The handled count of a type in the types table (0 while it has no row)."""
    count: int = page.evaluate(
        """name => {
            const cell = document.querySelector(`#types tr[data-type="${name}"] td.handled`);
            return cell ? Number(cell.textContent) : 0;
        }""",
        type_name,
    )
    return count


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
