"""requirements.lock: what `make install` installs, every version pinned and hashed, in step with pyproject.toml."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def locked_entries() -> list[str]:
    """One string per requirement of the lock: its continuation lines joined, comments dropped."""
    text = re.sub(r"#[^\n]*", "", (ROOT / "requirements.lock").read_text())
    return [entry.strip() for entry in text.replace("\\\n", " ").splitlines() if entry.strip()]


def test_every_locked_requirement_is_one_exact_version_with_hashes():
    for entry in locked_entries():
        requirement = Requirement(entry.split(" --hash")[0])
        assert str(requirement.specifier).startswith("=="), f"not pinned: {entry[:80]}"
        assert "--hash=sha256:" in entry, f"no hash (pip --require-hashes refuses the lock): {requirement.name}"


def test_every_pin_in_pyproject_is_the_locked_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = project["dependencies"] + project["optional-dependencies"]["dev"]
    locked = {}
    for entry in locked_entries():
        requirement = Requirement(entry.split(" --hash")[0])
        locked.setdefault(canonicalize_name(requirement.name), set()).add(str(requirement.specifier))
    for pin in map(Requirement, pinned):
        assert locked.get(canonicalize_name(pin.name)) == {str(pin.specifier)}, (
            f"pyproject.toml pins {pin}, requirements.lock has {locked.get(canonicalize_name(pin.name))}: run `make lock`"
        )
