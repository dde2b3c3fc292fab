"""Spec of the DAG as committed: dvc.yaml's real stages on tiny data, in a scratch clone of this repository.

One session fixture (tests/conftest.py's demo_run) clones the working tree, shrinks params.yaml (tiny synthetic
images, tiny sizes, one epoch, the MovieLens fixture instead of a download) and runs the whole DAG once; each test
then works on a copy of that run, so none depends on another. Every process runs with one torch thread: on CPU the
trained weights are bitwise repeatable for a given thread count, and two members training side by side on 2 cores do
not fight over them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import copy_repo, edit_params, lock_stages, members_of, run, stages_run

pytestmark = pytest.mark.slow

# What a rerun of train@<member> legitimately changes in its outputs: the clock. The rest is bitwise equal on CPU.
TIMING_KEYS = {"train_seconds", "images_per_second", "predict_seconds"}


def test_the_demo_dag_runs_every_stage_of_dvc_yaml(demo_run):
    stages = run(demo_run.repo, "dvc", "stage", "list", "--name-only").stdout.split()
    assert sorted(demo_run.ran) == sorted(stage for stage in stages if stage != "paddy_source")


def test_the_demo_dags_log_has_no_warning_the_pipeline_can_prevent(demo_run):
    # torch 2.10 deprecates the torch.jit.script fastai's layers.py uses at import (pipeline/__init__.py filters it);
    # runpy warned in each probe child while the forkserver preloaded pipeline.probe (pipeline/probe.py).
    assert any(stage.startswith("probe@") for stage in demo_run.ran)
    for warning in ("`torch.jit.script` is deprecated", "found in sys.modules after import of package"):
        assert warning not in demo_run.log


def test_a_second_repro_runs_nothing_and_changes_nothing(demo_run):
    assert stages_run(run(demo_run.repo, "dvc", "repro").stdout) == []
    assert run(demo_run.repo, "git", "status", "--porcelain").stdout == ""


# -- the experiment workflow: change a param, `dvc repro`, `dvc metrics diff` ---------------------------------------


@dataclass(frozen=True)
class ChangedMember:
    repo: Path
    member: str  # the member whose epochs went from 1 to 2
    others: list[str]
    ran: list[str]


@pytest.fixture(scope="module")
def changed_member(demo_run, tmp_path_factory) -> ChangedMember:
    repo = copy_repo(demo_run.repo, tmp_path_factory.mktemp("changed") / "repo")
    member, *others = members_of(repo)
    edit_params(repo, {f"train.members.{member}.epochs": 2})
    return ChangedMember(repo, member, others, stages_run(run(repo, "dvc", "repro").stdout))


def test_changing_a_member_param_reruns_that_member_and_the_ensemble_only(changed_member):
    assert f"train@{changed_member.member}" in changed_member.ran
    assert "ensemble" in changed_member.ran
    untouched = [f"{stage}@{other}" for other in changed_member.others for stage in ("probe", "train")]
    assert not set(changed_member.ran) & {*untouched, "paddy_data", "movielens_data", "collab"}


def test_the_changed_member_shows_in_dvc_metrics_diff(changed_member):
    diff = json.loads(run(changed_member.repo, "dvc", "metrics", "diff", "--json").stdout)
    assert diff[f"metrics/train/{changed_member.member}.json"]["epochs"] == {"old": 1, "new": 2, "diff": 1}
    for other in changed_member.others:
        assert f"metrics/train/{other}.json" not in diff  # unchanged metrics are left out of the diff
    assert "metrics/collab.json" not in diff
    curve = changed_member.repo / "dvclive" / "train" / changed_member.member / "plots" / "metrics" / "train" / "loss.tsv"
    assert len(curve.read_text().splitlines()) == 1 + 2  # header + one row per epoch: train read the new param


def test_after_the_change_a_second_repro_runs_nothing(changed_member):
    assert stages_run(run(changed_member.repo, "dvc", "repro").stdout) == []


# -- members in parallel: `make train-parallel` -----------------------------------------------------------------------


@dataclass(frozen=True)
class ParallelRun:
    repo: Path
    output: str
    most_writers_at_once: int  # the most processes seen holding DVC write locks at the same moment


def dvc_writer_pids(repo: Path) -> set[int]:
    """Processes holding DVC's per-path write locks (.dvc/tmp/rwlock), i.e. running a stage, right now."""
    try:
        locks = json.loads((repo / ".dvc" / "tmp" / "rwlock").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not there yet, or caught mid-write
        return set()
    return {holder["pid"] for holder in locks.get("write", {}).values()}


@pytest.fixture(scope="module")
def parallel_run(demo_run, tmp_path_factory) -> ParallelRun:
    """`make train-parallel` where data and probes are built and no member is trained yet."""
    repo = copy_repo(demo_run.before_training, tmp_path_factory.mktemp("parallel") / "repo")
    most, finished = 0, threading.Event()

    def watch_locks():
        nonlocal most
        while not finished.wait(0.1):
            most = max(most, len(dvc_writer_pids(repo)))

    watcher = threading.Thread(target=watch_locks)
    watcher.start()
    try:
        # Two GPU ids even on CPU: the test checks that each member gets its own; on CPU the variable changes nothing.
        result = run(repo, "make", "train-parallel", "JOBS=2", "GPUS=0 1", f"PYTHON={sys.executable}")
    finally:
        finished.set()
        watcher.join()
    return ParallelRun(repo, result.stdout, most)


def test_make_train_parallel_trains_the_members_at_the_same_time_one_gpu_each(parallel_run):
    members = members_of(parallel_run.repo)
    assert sorted(stages_run(parallel_run.output)) == sorted([f"train@{m}" for m in members] + ["ensemble"])
    assert parallel_run.most_writers_at_once == 2
    devices = re.findall(r">> train@\S+: CUDA_VISIBLE_DEVICES=(\S+)", parallel_run.output)
    assert sorted(devices) == ["0", "1"]


def test_members_trained_in_parallel_give_the_sequential_dvc_lock(parallel_run, demo_run):
    sequential, parallel = lock_stages(demo_run.repo), lock_stages(parallel_run.repo)
    timed = [f"metrics/train/{member}.json" for member in members_of(demo_run.repo)]
    for path in timed:
        old, new = (json.loads((repo / path).read_text()) for repo in (demo_run.repo, parallel_run.repo))
        assert {k: v for k, v in old.items() if k not in TIMING_KEYS} == {k: v for k, v in new.items() if k not in TIMING_KEYS}

    def without_timed_files(stages: dict) -> dict:
        return {
            name: {**stage, "outs": [out for out in stage.get("outs", []) if out["path"] not in timed]}
            for name, stage in stages.items()
        }

    assert without_timed_files(parallel) == without_timed_files(sequential)


def test_after_training_in_parallel_dvc_repro_runs_nothing(parallel_run):
    assert stages_run(run(parallel_run.repo, "dvc", "repro").stdout) == []


# -- trained members shared through a DVC remote ----------------------------------------------------------------------


@dataclass(frozen=True)
class PulledClone:
    trainer: Path  # clone A: ran the DAG, pushed
    laptop: Path  # clone B: a fresh git clone of A's commit, then `dvc pull`


@pytest.fixture(scope="module")
def pulled_clone(demo_run, tmp_path_factory) -> PulledClone:
    base = tmp_path_factory.mktemp("remote")
    trainer = copy_repo(demo_run.repo, base / "trainer")
    # docs/gpus.md's commands: a default remote, committed so that every clone knows it; push after training.
    run(trainer, "dvc", "remote", "add", "--default", "storage", str(base / "dvc-storage"))
    run(trainer, "git", "commit", "--quiet", "-m", "DVC remote", ".dvc/config")
    run(trainer, "dvc", "push")
    laptop = base / "laptop"
    subprocess.run(["git", "clone", "--quiet", str(trainer), str(laptop)], check=True)
    run(laptop, "dvc", "pull")
    return PulledClone(trainer, laptop)


def test_after_dvc_pull_dvc_repro_runs_nothing(pulled_clone):
    assert stages_run(run(pulled_clone.laptop, "dvc", "repro").stdout) == []


def test_after_dvc_pull_submit_gets_as_far_as_refusing_synthetic_data(pulled_clone):
    result = run(pulled_clone.laptop, "python", "-m", "pipeline.submit", check=False)
    assert result.returncode != 0
    (line,) = result.stdout.strip().splitlines()  # one line, naming the file and the fix
    assert line.startswith("submit: data/paddy/SOURCE.json: the data is synthetic")
