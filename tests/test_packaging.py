"""What an installed diffusers-hprune carries: every subpackage and the data files (templates, configs)."""

from __future__ import annotations

import tomllib
from importlib.resources import files
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_and_data_file_is_found_for_installation():
    """pyproject finds the packages (namespace packages: the data folders too) instead of a hand-kept list, and every
    file that is not code lies in a found package and matches the package data."""
    from fnmatch import fnmatch

    from setuptools import find_namespace_packages

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    find = config["packages"]["find"]
    assert find.get("namespaces", True)  # pyproject's default: folders without __init__.py are packages too
    found = set(find_namespace_packages(str(ROOT), include=find["include"], exclude=find.get("exclude", [])))
    code = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "diffusers_hprune").rglob("__init__.py")}
    assert code <= found and not [name for name in found if "__pycache__" in name]
    patterns = config["package-data"]["*"]
    data = [p for p in (ROOT / "diffusers_hprune").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert len(data) >= 40  # the toy models' configs, tokenizers and weights, the real configs, the card templates
    for path in data:
        assert ".".join(path.parent.relative_to(ROOT).parts) in found, path
        assert any(fnmatch(path.name, pattern) for pattern in patterns), path


def test_the_license_is_an_spdx_expression():
    """setuptools stops accepting the table form (license = {text = ...}) and license classifiers on 2027-02-18."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]


def test_data_files_are_installed():
    for template in ("model_card.md", "usage.md"):
        assert (files("diffusers_hprune.hub") / "templates" / template).is_file()
    assert (files("diffusers_hprune.families.sd3") / "configs" / "sd3.5-large.json").is_file()
    assert (files("diffusers_hprune.families.flux") / "configs" / "flux.1-schnell.json").is_file()
    # No hand-written custom code: pipelines/ holds the generated modeling file (a copy for review, kept current by
    # tests/test_export.py) and the script that writes it.
    assert sorted(p.name for p in (ROOT / "pipelines").glob("*.py")) == ["generate.py", "hprune_transformer.py"]
