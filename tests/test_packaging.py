"""What an installed diffusers-hprune carries: every subpackage and the data files (templates, configs)."""

from __future__ import annotations

import tomllib
from importlib.resources import files
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_for_installation():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "diffusers_hprune").rglob("__init__.py")}
    assert found == set(config["packages"])


def test_data_files_are_installed():
    for template in ("model_card.md", "usage.md"):
        assert (files("diffusers_hprune.hub") / "templates" / template).is_file()
    assert (files("diffusers_hprune.families") / "configs" / "sd3.5-large.json").is_file()
    # No hand-written custom code ships any more: the uploaded modeling file is generated (hub.remote_code).
    assert not list((ROOT / "pipelines").glob("*.py"))
