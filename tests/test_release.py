"""The version and the licence are the same wherever they are said."""

from __future__ import annotations

import re
from pathlib import Path

import maskopt

ROOT = Path(__file__).resolve().parents[1]


def _project_field(name: str) -> str:
    """A string field of pyproject.toml's [project] table (tomllib is not in Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    found = re.search(rf'^{name} = "([^"]+)"$', project, re.M)
    assert found is not None, name
    return found.group(1)


def test_the_version_matches_pyproject_and_the_newest_changelog_entry():
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    newest = re.search(r"^## (\S+) - \d{4}-\d{2}-\d{2}$", changelog, re.M)
    assert newest is not None
    assert maskopt.__version__ == _project_field("version") == newest.group(1)


def test_the_licence_file_is_the_one_pyproject_declares():
    assert _project_field("license") == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
