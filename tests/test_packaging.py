"""What an installed diffusers-hprune carries: every subpackage, the pipelines/ files, the templates."""

from __future__ import annotations

import tomllib
from importlib.resources import files
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_for_installation():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "diffusers_hprune").rglob("__init__.py")}
    assert found | {"diffusers_hprune.remote_code"} == set(config["packages"])
    assert config["package-dir"]["diffusers_hprune.remote_code"] == "pipelines"


def test_pipelines_folder_is_the_installed_remote_code():
    shipped = {p.name for p in (ROOT / "pipelines").glob("hprune_*_pipeline.py")}
    assert shipped == {"hprune_sd3_pipeline.py", "hprune_flux_pipeline.py"}
    for name in shipped:  # the installed package reads the same bytes as the repository holds
        assert (files("diffusers_hprune.remote_code") / name).read_bytes() == (ROOT / "pipelines" / name).read_bytes()
    assert (files("diffusers_hprune.hub") / "templates" / "model_card.md").is_file()
    assert (files("diffusers_hprune.families") / "configs" / "sd3.5-large.json").is_file()
