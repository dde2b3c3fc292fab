"""train@<member> killed with a real `kill -9` and run again ends exactly as the uninterrupted run.

The stage runs in its own process: `python -m pipeline.train tiny` in a scratch project on the tiny dataset, or
`dvc repro` of the project's own dvc.yaml in a scratch DVC repo. tests/killpoints/sitecustomize.py kills it at a
chosen point. The member trains with fine_tune, the competition's schedule (one frozen epoch, then one unfrozen),
with num_workers 0, so that runs can be compared byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import pipeline
from pipeline import vision

PROJECT = Path(pipeline.__file__).resolve().parents[1]  # the code under test, with its dvc.yaml and params.yaml
KILLPOINTS = Path(__file__).resolve().parent / "killpoints"
MEMBER = dict(arch="resnet10t", resize=40, method="squish", size=32, epochs=1, lr=0.01, schedule="fine_tune", accum=1)

pytestmark = pytest.mark.slow


def project_params() -> dict:
    """The project's params.yaml with one tiny member `tiny`; every other key is kept, so dvc.yaml's params exist."""
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    params["seed"] = 0
    params["validation"].update(valid_pct=0.25, seed=0, full=False)  # folds: 1, as the project's
    # One process with the main process's loader: the comparisons are byte for byte.
    params["train"].update(bs=16, tta=True, num_workers=0, devices=1, members=dict(tiny=MEMBER))
    if "ensemble" in params:
        params["ensemble"]["weights"] = dict(tiny=1)
    return params


def make_project(directory: Path, tiny_paddy: Path) -> Path:
    shutil.copytree(tiny_paddy, directory / "data" / "paddy")
    # every train@<member> depends on the pre-resized images too (dvc.yaml cannot tell which members read them)
    shutil.copytree(tiny_paddy, directory / "data" / "paddy_small")
    (directory / "params.yaml").write_text(yaml.safe_dump(project_params(), sort_keys=False))
    return directory


def run(command: list[str], cwd: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    """`command` with this interpreter first on PATH, the killpoints on PYTHONPATH and PADDY_KILL_AT = `kill_at`."""
    env = {key: value for key, value in os.environ.items() if key != "PADDY_KILL_AT"}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(KILLPOINTS), str(PROJECT)])
    env["DVC_NO_ANALYTICS"] = "1"
    if kill_at:
        env["PADDY_KILL_AT"] = kill_at
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def train(project: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "pipeline.train", "tiny"], project, kill_at)


def dvc(repo: Path, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], repo, kill_at)


def completed_epochs(project: Path) -> int:
    return json.loads((project / "models" / "checkpoints" / "tiny" / "state.json").read_text())["completed_epochs"]


def finished_outputs(project: Path) -> dict[str, bytes]:
    """A finished run's weights (tensor by tensor), predictions and DVCLive plots, as bytes by name."""
    weights = torch.load(project / "models" / "tiny.pth", weights_only=False)["state_dict"]
    outputs = {f"models/tiny.pth:{key}": tensor.numpy().tobytes() for key, tensor in weights.items()}
    files = [project / "preds" / "tiny" / name for name in ("test.csv", "valid.csv")]
    files += [path for path in (project / "dvclive" / "train" / "tiny" / "plots").rglob("*") if path.is_file()]
    return outputs | {str(path.relative_to(project)): path.read_bytes() for path in files}


def differences(actual: dict, expected: dict) -> list[str]:
    return sorted(name for name in actual.keys() | expected.keys() if actual.get(name) != expected.get(name))


@pytest.fixture(scope="module")
def uninterrupted(tiny_paddy, tmp_path_factory) -> dict[str, bytes]:
    project = make_project(tmp_path_factory.mktemp("uninterrupted"), tiny_paddy)
    finished = train(project)
    assert finished.returncode == 0, finished.stderr
    return finished_outputs(project)


def test_fine_tune_killed_in_the_frozen_epoch_and_in_the_unfrozen_phase_ends_as_the_uninterrupted_run(
    uninterrupted, tiny_paddy, tmp_path
):
    project = make_project(tmp_path, tiny_paddy)
    # Killed mid-epoch: in the frozen epoch (nothing checkpointed yet), then in the unfrozen one, so that the last
    # run resumes at the phase boundary, where fastai's unfreeze clears the optimiser state. (Resuming inside a
    # phase is the fit_one_cycle resume test's case.)
    for kill_at, checkpointed in (("epoch:0", 0), ("epoch:1", 1)):
        killed = train(project, kill_at)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        assert completed_epochs(project) == checkpointed

    finished = train(project)

    assert finished.returncode == 0, finished.stderr
    assert "resuming after epoch 1" in finished.stderr
    assert differences(finished_outputs(project), uninterrupted) == []


def test_dvc_repro_of_a_run_killed_during_tta_finishes_it_then_has_nothing_to_do(uninterrupted, tiny_paddy, tmp_path):
    repo = make_project(tmp_path, tiny_paddy)
    shutil.copy(PROJECT / "dvc.yaml", repo)
    shutil.copytree(PROJECT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(PROJECT / "folds", repo / "folds")  # a dep of train@tiny (its fold models' folder, none here)
    decision = repo / vision.probe_decision_path("tiny")  # a dep of train@tiny; its accum comes from params here
    decision.parent.mkdir(parents=True)
    decision.write_text(json.dumps(dict(member="tiny", accum=1, accum_source="params")))
    assert dvc(repo, "init", "--no-scm").returncode == 0

    killed = dvc(repo, "repro", "--single-item", "train@tiny", kill_at="tta")
    assert killed.returncode != 0 and completed_epochs(repo) == 2

    resumed = dvc(repo, "repro", "--single-item", "train@tiny")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming after epoch 2" in resumed.stderr
    assert differences(finished_outputs(repo), uninterrupted) == []

    again = dvc(repo, "repro", "--single-item", "train@tiny")
    assert again.returncode == 0 and "Running stage" not in again.stdout, again.stdout
