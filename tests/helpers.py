"""Helpers shared by the tests that run git, DVC or the stages in a scratch copy of this repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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
