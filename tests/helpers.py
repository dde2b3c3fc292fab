"""Helpers shared by the tests that run git, DVC or the stages in a scratch copy of this repository."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@example.com",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@example.com",
}


def project_env(repo: Path, **extra: str) -> dict:
    """The environment of a command in `repo`: this Python's dvc and python first on PATH, the repo's own code
    (PYTHONPATH: a stage's `python -m pipeline.<stage>` must import the scratch copy, not the installed project),
    a git identity, no DVC analytics; `extra` on top."""
    return {
        **os.environ,
        **GIT_IDENTITY,
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": str(repo),
        "DVC_NO_ANALYTICS": "1",
        **extra,
    }


def scratch_clone(target: Path) -> None:
    """A git clone of this repository with the working tree's files on top, so uncommitted edits are tested too."""
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(target)], check=True)
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    for name in filter(None, listed.split("\0")):
        source, copy = ROOT / name, target / name
        if source.is_file():
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy)
        elif copy.is_file():  # deleted in the working tree, not yet committed
            copy.unlink()


# -- the demo DAG on tiny data (tests/conftest.py's demo_run, test_dag.py, test_dag_folds.py) ---------------------

RUNNING_STAGE = re.compile(r"Running stage '([^']+)'")
TINY_PARAMS = {
    "data.synthetic.train_per_class": 8,  # the smallest class gets 4
    "data.synthetic.n_test": 10,
    "data.synthetic.image_size": [48, 64],
    "probe.accums": [1],
    "train.bs": 8,
    "movielens.source": "tests/fixtures/movielens",  # relative to the clone's root, where DVC runs the stage
    "collab.epochs": 1,
    "collab.bs": 16,
    "collab.report_min_ratings": 5,
}
TINY_MEMBER = {"resize": 32, "size": 32, "epochs": 1}


@dataclass(frozen=True)
class DemoRun:
    repo: Path  # the clone after `dvc repro`, its outputs committed
    before_probes: Path  # a copy taken when the data, small images and collab were built, nothing of a member yet
    before_training: Path  # a copy taken when everything but the members' training and the ensemble was built
    ran: list[str]  # the stages DVC ran, in order
    log: str  # what `dvc repro` and its stages printed, stdout and stderr


def run(repo: Path, *command: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=repo, env=project_env(repo, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )
    if check:
        assert result.returncode == 0, f"{' '.join(command)} failed in {repo}:\n{result.stdout[-4000:]}"
    return result


def stages_run(output: str) -> list[str]:
    """The stages DVC ran, but paddy_source: it runs at every `dvc repro` (always_changed), by design."""
    return [stage for stage in RUNNING_STAGE.findall(output) if stage != "paddy_source"]


def set_key(params: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    section = params
    for key in parents:
        section = section[key]
    section[last] = value


def edit_params(repo: Path, changes: dict) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in changes.items():
        set_key(params, dotted, value)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def members_of(repo: Path) -> list[str]:
    return list(yaml.safe_load((repo / "params.yaml").read_text())["train"]["members"])


def shrink_params(repo: Path) -> None:
    changes = dict(TINY_PARAMS)
    for member in members_of(repo):
        changes.update({f"train.members.{member}.{key}": value for key, value in TINY_MEMBER.items()})
    edit_params(repo, changes)


def copy_repo(source: Path, target: Path) -> Path:
    """An independent copy: git history, workspace and DVC cache."""
    shutil.copytree(source, target, symlinks=True)
    return target


def lock_stages(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
