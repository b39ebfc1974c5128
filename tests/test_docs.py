"""The docs keep up with the code: the settings reference is generated, and every relative link lands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fastapi_catga import CatgaSettings
from scripts import gen_config_docs

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)
CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*$", re.MULTILINE)


def test_the_configuration_reference_is_generated_from_the_settings() -> None:
    text = gen_config_docs.DOC.read_text()
    assert gen_config_docs.update(text) == text, (
        "docs/configuration.md differs from CatgaSettings: run `.venv/bin/python -m scripts.gen_config_docs`"
    )


def test_the_reference_names_every_setting() -> None:
    table = gen_config_docs.render_table()
    for name in CatgaSettings.model_fields:
        assert f"`CATGA_{name.upper()}`" in table


def test_a_file_without_markers_is_refused() -> None:
    with pytest.raises(ValueError, match="marker"):
        gen_config_docs.update("# Configuration\n")


def anchors(page: Path) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, punctuation dropped, spaces as '-'."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(page: Path) -> list[str]:
    """Link targets outside code blocks and code spans."""
    return LINK.findall(CODE.sub("", FENCE.sub("", page.read_text())))


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_that_exists(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target} (no heading makes #{anchor} in {linked.name})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: " + "; ".join(broken)


def test_the_readme_links_to_the_docs() -> None:
    assert "docs/README.md" in links(ROOT / "README.md")
