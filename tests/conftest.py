"""Fixtures shared by every test module: a tiny synthetic paddy dataset in the competition's layout, a dead pid, and
one run of the demo DAG on tiny data."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import DemoRun, copy_repo, run, scratch_clone, shrink_params, stages_run
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


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> DemoRun:
    """The whole demo DAG (dvc.yaml's real stages) on tiny params in a scratch clone, its outputs committed.

    Session-scoped: test_dag.py, test_dag_folds.py and test_probe.py start from it or from a copy taken on the way,
    which costs a copytree where a rebuild would cost every stage's Python start and DVC's. Copy before changing.
    """
    base = tmp_path_factory.mktemp("dag")
    repo = base / "repo"
    scratch_clone(repo)
    shrink_params(repo)
    run(repo, "git", "commit", "--quiet", "-am", "tiny params")
    # In steps so that copies can be kept between them; DVC runs exactly what one `dvc repro` would.
    steps = [run(repo, "dvc", "repro", "small_images", "collab")]
    before_probes = copy_repo(repo, base / "before_probes")
    steps.append(run(repo, "dvc", "repro", "probe"))
    before_training = copy_repo(repo, base / "before_training")
    steps.append(run(repo, "dvc", "repro"))
    run(repo, "git", "add", "--all")
    run(repo, "git", "commit", "--quiet", "-m", "demo DAG run: dvc.lock, metrics, plots")
    log = "".join(step.stdout for step in steps)
    return DemoRun(repo=repo, before_probes=before_probes, before_training=before_training, ran=stages_run(log), log=log)
