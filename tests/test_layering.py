"""The folders are the architecture: a layer never imports one above it (an AST walk of the package)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fastapi_catga"
WEB = ("fastapi", "starlette")
BROKERS = ("nats", "redis")
UP = {"cluster", "transports", "web", "bootstrap", "settings"}
MODULES = sorted(PACKAGE.rglob("*.py"))


def imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = ["fastapi_catga", *path.relative_to(PACKAGE).parent.parts]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            names.update({module} | {f"{module}.{alias.name}" for alias in node.names})
    return names


def forbidden(path: Path) -> set[str]:
    parts = path.relative_to(PACKAGE).parts
    layer = parts[0] if len(parts) > 1 else path.stem
    banned = (set(WEB) if layer != "web" else set()) | (set(BROKERS) if layer != "transports" else set())
    if layer in ("core", "transports", "cluster", "cli"):  # the CLI is a broker client: no app, no node
        banned |= {"fastapi_catga.web", "fastapi_catga.bootstrap"}
    if layer == "core":
        banned |= {f"fastapi_catga.{name}" for name in UP}
    return banned


@pytest.mark.parametrize("path", MODULES, ids=lambda path: str(path.relative_to(PACKAGE)))
def test_no_layer_reaches_up(path: Path) -> None:
    names, banned = imports(path), forbidden(path)
    if path.relative_to(PACKAGE).parts[0] in ("core", "transports", "cluster", "cli"):
        assert "fastapi_catga" not in names, "import the submodule, not the package (it pulls in web/)"
    bad = sorted(n for n in names if any(n == b or n.startswith(f"{b}.") for b in banned))
    assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}"


def test_the_walk_sees_the_layers() -> None:
    assert imports(PACKAGE / "web" / "router.py") >= {"fastapi", "fastapi_catga.bootstrap"}
    assert "fastapi_catga.core.messages" in imports(PACKAGE / "core" / "handlers.py")
    assert {"fastapi", "nats"} <= forbidden(PACKAGE / "core" / "mediator.py")
    assert "nats" not in forbidden(PACKAGE / "transports" / "nats" / "transport.py")
    assert {"fastapi", "fastapi_catga.web"} <= forbidden(PACKAGE / "cli" / "main.py")


def test_importing_the_package_loads_no_broker_client() -> None:
    code = "import sys, fastapi_catga; print(sorted({'nats', 'redis'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
