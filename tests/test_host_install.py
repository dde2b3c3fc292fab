"""`make install PYTHON=...` (pipeline/host_install.py): a host's stack is kept, what is missing or out of range is
installed from the lock, and torch/torchvision outside their range are refused, not replaced.

The scratch environments are venvs whose "installed" packages are bare dist-info folders (what pip and
importlib.metadata read), so nothing of several GB is installed: pip's --dry-run --report says what it would do
(it reads the few packages it plans from the package index, as `make install` does).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import venv
from pathlib import Path

import pip
import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
from pipeline import host_install  # noqa: E402  (run as a script by make install, before any dependency exists)


def requirements() -> list[Requirement]:
    return host_install.project_requirements(ROOT / "pyproject.toml")


def oldest_versions() -> dict[str, str]:
    """Every dependency at its lower bound: the oldest supported stack (Kaggle's)."""
    return host_install.locked_versions(ROOT / "requirements-oldest.lock")


def test_the_plan_keeps_what_is_in_range_and_takes_the_rest_from_the_lock():
    locked = host_install.locked_versions(ROOT / "requirements.lock")
    installed = oldest_versions() | {"timm": "1.0.14", "numpy": "3.0.0", "dvc": None}
    steps = {step["name"]: step for step in host_install.plan(requirements(), installed, locked)}

    assert (steps["torch"]["action"], steps["torch"]["have"]) == ("kept", "2.10.0")
    assert (steps["fastcore"]["action"], steps["fastcore"]["have"]) == ("kept", "1.14.5")
    assert (steps["timm"]["action"], steps["timm"]["want"]) == ("upgraded", locked["timm"])
    assert (steps["numpy"]["action"], steps["numpy"]["want"]) == ("downgraded", locked["numpy"])
    assert (steps["dvc"]["action"], steps["dvc"]["want"]) == ("installed", locked["dvc"])
    assert {step["action"] for name, step in steps.items() if name not in ("timm", "numpy", "dvc")} == {"kept"}


@pytest.mark.parametrize("name, version", [("torch", "2.9.1"), ("torchvision", "0.24.0")])
def test_torch_or_torchvision_outside_the_range_is_refused_not_replaced(name, version):
    installed = oldest_versions() | {name: version}
    steps = host_install.plan(requirements(), installed, host_install.locked_versions(ROOT / "requirements.lock"))
    assert [(step["name"], step["action"]) for step in steps if step["action"] != "kept"] == [(name, "refused")]


def fake_environment(root: Path, installed: dict[str, str], requires: dict[str, list[str]] = {}) -> Path:
    """A venv whose site-packages holds a bare dist-info for each of `installed`, and this pip; its python."""
    venv.EnvBuilder(with_pip=False).create(root)
    site_packages = next(root.glob("lib/python*/site-packages"))
    shutil.copytree(Path(pip.__file__).parent, site_packages / "pip")  # ensurepip takes half a minute
    for name, version in installed.items():
        info = site_packages / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        lines += [f"Requires-Dist: {entry}" for entry in requires.get(name, [])]
        (info / "METADATA").write_text("\n".join(lines) + "\n")
        (info / "INSTALLER").write_text("pip\n")
        (info / "RECORD").write_text("")
    return root / "bin" / "python"


def run_host_install(python: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), str(ROOT / "pipeline" / "host_install.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_an_out_of_range_torch_is_refused_in_one_line_and_nothing_is_installed(tmp_path):
    python = fake_environment(tmp_path / "env", oldest_versions() | {"torch": "2.9.1"})
    outcome = run_host_install(python)
    assert outcome.returncode == 1
    assert outcome.stderr.strip().count("\n") == 0, outcome.stderr
    assert "torch>=2.10.0,<3" in outcome.stderr and "torch 2.9.1" in outcome.stderr
    assert not list((tmp_path / "env").glob("lib/python*/site-packages/*paddy*")), "installed all the same"


def test_kaggles_stack_is_kept_and_a_small_package_below_its_range_is_brought_to_the_locks_version(tmp_path):
    """Kaggle-like: every dependency at its lower bound, except timm below it and psutil missing; torch's
    CUDA libraries are installed requirements of torch. pip must plan timm and psutil, and nothing of the rest."""
    installed = oldest_versions() | {"timm": "1.0.14", "nvidia-cublas-cu12": "12.8.4.1"}
    del installed["psutil"], installed["setuptools"]  # setuptools: pip builds the project in isolation
    # an upgrade of the CUDA library would be allowed by torch's metadata: the constraints must stop it
    python = fake_environment(tmp_path / "env", installed, {"torch": ["nvidia-cublas-cu12>=12"]})
    report = tmp_path / "plan.json"
    outcome = run_host_install(python, "--pip-arg=--dry-run", f"--pip-arg=--report={report}")
    assert outcome.returncode == 0, outcome.stderr[-3000:]

    locked = host_install.locked_versions(ROOT / "requirements.lock")
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.loads(report.read_text())["install"]}
    assert planned["timm"] == locked["timm"] and planned["psutil"] == locked["psutil"]
    kept = set(installed) - {"timm"}
    assert not kept & set(planned), f"pip would replace {kept & set(planned)}"
    lines = outcome.stdout.splitlines()
    assert "kept       torch 2.10.0 (range >=2.10.0,<3)" in lines
    assert "kept       fastcore 1.14.5 (range >=1.14.5,<3)" in lines
    assert f"would be upgraded   timm 1.0.14 -> {locked['timm']} (range >=1.0.19,<2)" in lines
    assert f"would be installed  psutil {locked['psutil']}" in lines


def test_an_upgrade_that_needs_a_kept_package_replaced_fails_instead_of_replacing_it(tmp_path):
    """The lock's fastai needs fastcore 2; the host keeps fastcore 1.14 (Kaggle's pair): pip must refuse, not
    upgrade fastcore behind the user's back (the constraints file pins every kept package)."""
    installed = oldest_versions() | {"fastai": "2.7.19"}
    del installed["setuptools"]
    python = fake_environment(tmp_path / "env", installed)
    report = tmp_path / "plan.json"
    outcome = run_host_install(python, "--pip-arg=--dry-run", f"--pip-arg=--report={report}")
    assert outcome.returncode != 0
    assert "fastcore" in outcome.stderr and not report.exists()
