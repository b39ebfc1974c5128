"""The docs keep up with the code: the settings reference is generated from `CatgaSettings`."""

from __future__ import annotations

import pytest

from fastapi_catga import CatgaSettings
from scripts import gen_config_docs


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
