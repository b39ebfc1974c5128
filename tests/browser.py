"""Headless Chromium for the browser tests: Debian's /usr/bin/chromium, driven by Playwright.

Never `playwright install`: the browser is the system's (.ci/run installs it), nothing downloads one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from playwright.sync_api import Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"


@contextmanager
def chromium_page() -> Iterator[Page]:
    """A page in a fresh headless browser, closed after."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run .ci/run, which installs Debian's chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser.new_page(viewport={"width": 1280, "height": 720})
        finally:
            browser.close()


def shown_nodes(page: Page) -> dict[str, bool]:
    """Node id -> greyed out, as the dashboard's nodes table shows them now (read in one go: the
    page redraws its tables every second)."""
    rows: list[list[object]] = page.eval_on_selector_all(
        "#nodes tbody tr", "rows => rows.map(r => [r.dataset.node, r.classList.contains('gone')])"
    )
    return {str(node): bool(gone) for node, gone in rows}


def handled(page: Page, type_name: str) -> int:
    """The handled count of a type in the dashboard's types table (0 while it has no row)."""
    count: int = page.evaluate(
        """name => {
            const cell = document.querySelector(`#types tr[data-type="${name}"] td.handled`);
            return cell ? Number(cell.textContent) : 0;
        }""",
        type_name,
    )
    return count
