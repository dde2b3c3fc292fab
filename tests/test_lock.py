"""requirements.lock (what `make install` puts in .venv) and requirements-oldest.lock (the oldest supported stack,
tested by CI): every version pinned and hashed, each inside pyproject.toml's ranges, the oldest one at their lower
bounds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


LOCKS = ["requirements.lock", "requirements-oldest.lock"]


def locked_entries(lock: str) -> list[str]:
    """One string per requirement of the lock: its continuation lines joined, comments dropped."""
    text = re.sub(r"#[^\n]*", "", (ROOT / lock).read_text())
    return [entry.strip() for entry in text.replace("\\\n", " ").splitlines() if entry.strip()]


def locked_versions(lock: str) -> dict[str, set[Version]]:
    """Name -> the versions the lock pins for it (two where its entries differ by platform or Python)."""
    locked: dict[str, set[Version]] = {}
    for entry in locked_entries(lock):
        requirement = Requirement(entry.split(" --hash")[0])
        locked.setdefault(canonicalize_name(requirement.name), set()).add(Version(str(requirement.specifier)[2:]))
    return locked


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(map(Requirement, project["dependencies"] + project["optional-dependencies"]["dev"]))


@pytest.mark.parametrize("lock", LOCKS)
def test_every_locked_requirement_is_one_exact_version_with_hashes(lock):
    for entry in locked_entries(lock):
        requirement = Requirement(entry.split(" --hash")[0])
        assert str(requirement.specifier).startswith("=="), f"not pinned: {entry[:80]}"
        assert "--hash=sha256:" in entry, f"no hash (pip --require-hashes refuses the lock): {requirement.name}"


@pytest.mark.parametrize("lock", LOCKS)
def test_every_dependency_of_pyproject_is_locked_inside_its_range(lock):
    locked = locked_versions(lock)
    for requirement in project_requirements():
        versions = locked.get(canonicalize_name(requirement.name))
        assert versions and all(version in requirement.specifier for version in versions), (
            f"pyproject.toml wants {requirement}, {lock} has {versions}: run `make lock`"
        )


def test_the_oldest_lock_is_every_dependency_at_its_lower_bound():
    locked = locked_versions("requirements-oldest.lock")
    for requirement in project_requirements():
        lower = {Version(bound.version) for bound in requirement.specifier if bound.operator == ">="}
        assert len(lower) == 1, f"pyproject.toml: {requirement} has no single lower bound (>=)"
        assert locked[canonicalize_name(requirement.name)] == lower, (
            f"pyproject.toml's lower bound of {requirement.name} is {lower.pop()}, requirements-oldest.lock has "
            f"{locked[canonicalize_name(requirement.name)]}: run `make lock`"
        )
