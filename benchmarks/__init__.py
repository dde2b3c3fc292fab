"""Benchmarks of the paddy pipeline (docs/benchmarks.md): speed and memory targets live here, not in the tests.

Not part of the installed package: run from the repository root, `python -m benchmarks [names]` or `make bench`.
Each module has `run() -> dict` and uses the pipeline's public functions only; below, what several of them share.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import yaml

from pipeline.params import PARAMS_FILE

REPO_ROOT = Path(__file__).resolve().parent.parent


class WorkspaceError(RuntimeError):
    """A scratch workspace cannot be made (no git, a failing command): one line saying what to fix."""


def stage_env(workdir: Path) -> dict:
    """The stages import the workspace's code and run with this interpreter (dvc.yaml says `python -m ...`)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PYTHONPATH": str(workdir), "PATH": path, "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1"}


def copy_repo(repo: Path, workdir: Path) -> int:
    """Copy the repository's tracked and untracked-not-ignored files into workdir (never data/, models/ or the DVC
    cache: the user's workspace is only read); returns how many."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, check=True,
                                capture_output=True, text=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        raise WorkspaceError(f"{repo}: `git ls-files` failed; run the benchmark from a git checkout") from None
    files = [path for path in listed.split("\0") if path and (repo / path).is_file()]  # not a deleted tracked file
    for relative in files:
        (workdir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / relative, workdir / relative)
    return len(files)


def make_workspace(workdir: Path, params: Mapping[str, Any], header: str) -> None:
    """A git + DVC repository in workdir: a copy of this one, `params` as its params.yaml under `header`, one commit.

    Rather than `dvc exp run --temp -S`: a temporary experiment caches its outputs (large members' weights) in the
    user's DVC cache, and is deleted when its run is killed, so the rehearsal's resume could not be checked.
    """
    copy_repo(REPO_ROOT, workdir)
    (workdir / PARAMS_FILE).write_text(header + yaml.safe_dump(dict(params), sort_keys=False))
    commit = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench"]
    # Hard links: the large members' weights are not copied a second time into the workspace's DVC cache.
    for command in (["git", "init", "-q"], ["git", "add", "-A"], commit,
                    [sys.executable, "-m", "dvc", "config", "--local", "cache.type", "hardlink,copy"]):
        done = subprocess.run(command, cwd=workdir, env=stage_env(workdir), capture_output=True, text=True)
        if done.returncode:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise WorkspaceError(f"{workdir}: `{' '.join(command[-3:])}` failed ({reason})")
