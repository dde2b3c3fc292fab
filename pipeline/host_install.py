"""`make install PYTHON=...`: install paddy-pipeline into an existing Python (Kaggle, Colab, conda), keeping its stack.

Run by the host's interpreter before any dependency exists: the standard library and pip's vendored packaging and
tomli only. What is kept, installed, moved or refused: docs/install.md, "A host's own Python".
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from pip._vendor.packaging.markers import default_environment
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import canonicalize_name
from pip._vendor.packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
HOST_OWNED = ("torch", "torchvision")  # never replaced: refused when outside the range


def project_requirements(pyproject: Path) -> list[Requirement]:
    project = tomllib.loads(pyproject.read_text())["project"]
    return [Requirement(entry) for entry in project["dependencies"] + project["optional-dependencies"]["dev"]]


def locked_versions(lock: Path) -> dict[str, str]:
    """Name -> version of the lock's entries whose marker holds for this interpreter (the lock is universal)."""
    environment = default_environment()
    versions = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"([A-Za-z0-9._-]+==[^\s\\]+(?:\s*;[^\\]+)?)", line)
        if match:
            requirement = Requirement(match.group(1).strip())
            if requirement.marker is None or requirement.marker.evaluate(environment):
                versions[canonicalize_name(requirement.name)] = str(requirement.specifier)[2:]
    return versions


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def plan(requirements: list[Requirement], installed: dict[str, str | None], locked: dict[str, str]) -> list[dict]:
    """One step per requirement: action kept / installed / upgraded / downgraded / refused, with versions."""
    steps = []
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        have, want = installed.get(name), locked[name]
        shown_range = ",".join(sorted(map(str, requirement.specifier), key=lambda bound: not bound.startswith(">")))
        action = ("kept" if have is not None and requirement.specifier.contains(have, prereleases=True)
                  else "installed" if have is None else "refused" if name in HOST_OWNED
                  else "upgraded" if Version(have) < Version(want) else "downgraded")
        steps.append(dict(name=requirement.name, range=shown_range, have=have, want=want, action=action))
    return steps


def installed_requirement_closure(names: list[str]) -> dict[str, str]:
    """Name -> installed version of these distributions and everything they require that is installed."""
    environment = default_environment()
    pending, closure = list(names), {}
    while pending:
        name = canonicalize_name(pending.pop())
        version = installed_version(name)
        if name in closure or version is None:
            continue
        closure[name] = version
        for entry in metadata.requires(name) or []:
            requirement = Requirement(entry)
            if requirement.marker is None or requirement.marker.evaluate(environment | {"extra": ""}):
                pending.append(requirement.name)
    return closure


def shown(step: dict) -> str:
    if step["action"] == "kept":
        return f"kept       {step['name']} {step['have']} (range {step['range']})"
    if step["action"] == "installed":
        return f"installed  {step['name']} {step['want']}"
    return f"{step['action']:<10} {step['name']} {step['have']} -> {step['want']} (range {step['range']})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock", type=Path, default=ROOT / "requirements.lock")
    parser.add_argument("--pip-arg", action="append", default=[], metavar="ARG",
                        help="passed on to pip install (e.g. --pip-arg=--dry-run --pip-arg=--report=plan.json)")
    args = parser.parse_args(argv)
    requirements = project_requirements(ROOT / "pyproject.toml")
    steps = plan(requirements, {canonicalize_name(r.name): installed_version(r.name) for r in requirements},
                 locked_versions(args.lock))
    for step in steps:
        if step["action"] == "refused":
            print(f"paddy-pipeline needs {step['name']}{step['range']}; this Python has {step['name']} {step['have']}: "
                  f"install a {step['name']} in that range (with its matching torch/torchvision) or use `make install` "
                  "(no PYTHON: the lock into .venv)", file=sys.stderr)
            return 1
    pinned = installed_requirement_closure(list(HOST_OWNED))
    pinned |= {canonicalize_name(s["name"]): s["have"] for s in steps if s["action"] == "kept"}
    wanted = [f"{s['name']}=={s['want']}" for s in steps if s["action"] != "kept"]
    with tempfile.TemporaryDirectory() as scratch:
        constraints = Path(scratch) / "kept.txt"
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in sorted(pinned.items())))
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--constraint", str(constraints), *args.pip_arg]
        # One resolution: what is wanted, and the project itself (editable) whose ranges the kept packages meet.
        # Built by the installed setuptools when it is recent enough (no download), else in pip's isolated build.
        setuptools = installed_version("setuptools")
        isolation = [] if setuptools is None or Version(setuptools) < Version("68") else ["--no-build-isolation"]
        subprocess.run([*pip, *isolation, *wanted, "--editable", str(ROOT)], check=True)
    dry_run = any(arg.startswith("--dry-run") for arg in args.pip_arg)
    for step in steps:
        print(("would be " if dry_run and step["action"] != "kept" else "") + shown(step))
    return 0


if __name__ == "__main__":
    sys.exit(main())
