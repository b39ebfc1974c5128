from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the test, never from ``CATGA_*`` variables of the shell that runs it."""
    for name in [name for name in os.environ if name.startswith("CATGA_")]:
        monkeypatch.delenv(name)
