"""Fixtures shared by every test module: a tiny synthetic paddy dataset in the competition's layout, a dead pid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.synthetic import write_synthetic_dataset

TINY_PADDY = dict(train_per_class=8, n_test=20, image_size=(48, 64), seed=0)


@pytest.fixture(scope="session")
def tiny_paddy(tmp_path_factory) -> Path:
    """Data dir of a tiny synthetic set: 10 classes x 8 images (the smallest class 4), 20 test images, 48x64 jpgs.

    Session-scoped and shared: copy it (shutil.copytree) before changing anything in it.
    """
    data_dir = tmp_path_factory.mktemp("tiny_paddy") / "paddy"
    write_synthetic_dataset(data_dir, **TINY_PADDY)
    return data_dir


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited and been reaped: the owner of a scratch folder left by a killed run."""
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    return finished.pid
