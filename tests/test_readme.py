"""The README's code is the example app's code."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = re.compile(r"<!-- example: (?P<path>\S+) -->\n```python\n(?P<code>.*?)\n```", re.DOTALL)


def test_readme_examples_are_the_example_apps_code() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = list(EXAMPLE.finditer(readme))
    assert len(blocks) >= 3
    for block in blocks:
        source = (ROOT / block["path"]).read_text()
        assert block["code"] in source, f"README block from {block['path']} differs from the file"


def test_readme_opens_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    assert first_block.splitlines()[0].startswith("./scripts/serve")
    assert first_block.splitlines()[1].startswith("./scripts/check")
    assert "exec scripts/check" in (ROOT / ".ci" / "run").read_text()
