"""`make kaggle-run` against a fake Kaggle API (tests/fake_kaggle.py) with the real client, and its kernel's script
run on CPU in a fake Kaggle layout.

Once per module: a git repository of this working tree with the tiny demo profile (tests/test_kaggle_notebook.py's),
its code archive attached in a fake /kaggle/input beside tiny synthetic competition data, and the kernel script that
`make kaggle-run` pushes run there. Its /kaggle/working is the fake kernel's output in every test.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline import kaggle_run
from pipeline.paddy import COMPETITION
from pipeline.synthetic import write_synthetic_dataset
from tests.fake_kaggle import FakeKaggle, Kernel
from tests.test_kaggle_notebook import RUNNING_STAGE, fork_of_this_tree, tiny_demo_profile

pytestmark = pytest.mark.slow

SECRET = "-".join(["fake", "kaggle", "key", "4711"])  # not literally in this file: the archive holds it
NAME = "paddy-pipeline-run"
# One member and what it needs (not the ensemble, nor the MovieLens branch): the test's time goes into stage starts.
CFG = kaggle_run.RunConfig(NAME, ("train@full_size",), "demo", 2, 1, True, False, 0, 1)


def clean_env(tmp: Path) -> dict:
    makes = ("ARGS", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
    env = {name: value for name, value in os.environ.items() if not name.startswith("KAGGLE_") and name not in makes}
    return env | {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "HOME": str(tmp / "home"), "OMP_NUM_THREADS": "1", "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
    }


def run_kernel(kaggle: Path, script: str, env: dict) -> subprocess.CompletedProcess:
    """The pushed script in the fake layout: /kaggle/ is `kaggle`, the session's variables set."""
    (kaggle / "script.py").write_text(script.replace("/kaggle/", f"{kaggle}/"))
    env = env | {"KAGGLE_KERNEL_RUN_TYPE": "Batch", "PADDY_KAGGLE_INPUT": str(kaggle / "input"),
                 "PYTHONPATH": str(kaggle / "working" / "paddy-pipeline")}  # what the install's editable install does
    return subprocess.run([sys.executable, str(kaggle / "script.py")], env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)


def output_files(working: Path) -> dict[str, bytes]:
    return {str(path.relative_to(working)): path.read_bytes() for path in sorted(working.rglob("*"))
            if path.is_file() and not path.is_symlink()}


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """(workspace, the kernel's output files, its output text, the fake /kaggle)."""
    tmp = tmp_path_factory.mktemp("kaggle_run")
    env = clean_env(tmp)
    workspace = tmp / "workspace"
    workspace.mkdir()
    fork_of_this_tree(workspace, env)
    tiny_demo_profile(workspace, env)
    kaggle = tmp / "kaggle"
    mounted = kaggle / "input" / COMPETITION
    write_synthetic_dataset(mounted, train_per_class=8, n_test=10, image_size=(32, 48), seed=0)
    for path in [mounted, *mounted.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    (kaggle / "input" / f"{NAME}-code").mkdir()
    kaggle_run.code_archive(kaggle / "input" / f"{NAME}-code" / kaggle_run.ARCHIVE, workspace)
    (kaggle / "working").mkdir()
    script = kaggle_run.kernel_script(CFG, install=False)
    result = run_kernel(kaggle, script, env)
    assert result.returncode == 0, result.stdout[-5000:]
    yield workspace, output_files(kaggle / "working"), result.stdout, kaggle, env
    for path in [mounted, *mounted.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


@pytest.fixture
def fake():
    server = FakeKaggle()
    yield server
    server.close()


@pytest.fixture
def workspace(session, fake, tmp_path, monkeypatch):
    """A copy of the session's workspace as the current folder, the client pointed at the fake with credentials."""
    copy = tmp_path / "workspace"
    shutil.copytree(session[0], copy, symlinks=True)
    monkeypatch.chdir(copy)
    for name, value in {**clean_env(tmp_path), **fake.env(), "KAGGLE_USERNAME": "tester", "KAGGLE_KEY": SECRET}.items():
        monkeypatch.setenv(name, value)
    for name in [name for name in os.environ if name.startswith("KAGGLE_") and name not in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_ENVIRONMENT")]:
        monkeypatch.delenv(name)
    return copy


def snapshot(folder: Path) -> dict[str, bytes]:
    return {name: data for name, data in output_files(folder).items() if not name.startswith((".git/", ".kaggle-run/"))}


def fails(message: str, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        kaggle_run.main(["--profile", "demo", "--poll", "0", "--wait-hours", "0.0002"])
    text = str(exit_info.value.code)
    assert text.startswith("kaggle-run: ") and "\n" not in text and message in text, text
    assert SECRET not in text + capsys.readouterr().err
    return text


def test_the_kernel_script_trains_the_demo_profile_in_a_fake_kaggle_layout(session):
    _, files, output, _, _ = session
    ran = {"params", "paddy_source", "paddy_data", "small_images", "probe@full_size", "train@full_size"}
    assert set(RUNNING_STAGE.findall(output)) == ran
    marker = json.loads(files[f"paddy-pipeline/{kaggle_run.MARKER}"])
    assert marker == {"finished": True, "stale": [], "failed": None}
    assert "paddy-pipeline/models/full_size.pth" in files and "paddy-pipeline/preds/full_size/valid.csv" in files
    assert not any(name.startswith("paddy-pipeline/data/paddy/train_images") for name in files)  # links, dropped


def test_make_kaggle_run_pushes_a_gpu_kernel_and_brings_its_outputs_into_dvc(session, fake, workspace):
    fake.run = lambda push: Kernel(statuses=["QUEUED", "RUNNING", "COMPLETE"], files=session[1])
    before = (workspace / "dvc.lock").read_text()
    result = subprocess.run(["make", f"PYTHON={sys.executable}", "kaggle-run", "ARGS=--profile demo --poll 0 --members full_size"],
                            env=os.environ | {"PYTHONPATH": str(workspace)}, text=True, capture_output=True)
    assert result.returncode == 0, result.stderr[-3000:]
    push = fake.pushes[0]
    assert push["enableGpu"] and push["enableInternet"] and push["isPrivate"]
    assert push["competitionDataSources"] == [COMPETITION]
    assert push["datasetDataSources"] == [f"tester/{NAME}-code"] and push.get("kernelDataSources", []) == []
    assert "'profile': 'demo'" in push["text"]
    [[archive]] = [list(version) for version in fake.datasets[f"tester/{NAME}-code"]]
    assert archive == kaggle_run.ARCHIVE
    assert (workspace / "models/full_size.pth").is_file() and (workspace / "preds/full_size").is_dir()
    assert (workspace / "dvc.lock").read_text() != before
    status = json.loads(subprocess.run([sys.executable, "-m", "dvc", "status", "--json", "--with-deps",
                                        "train@full_size"], capture_output=True, text=True, check=True).stdout)
    assert {stage: change for stage, change in status.items() if change != ["always changed"]} == {}
    everything = b"".join(fake.bodies) + result.stdout.encode() + result.stderr.encode()
    assert SECRET.encode() not in everything

    # The next run attaches this one's output: the kernel resumes from it.
    fake.run = lambda push: Kernel(statuses=["COMPLETE"], files=session[1])
    kaggle_run.main(["--profile", "demo", "--poll", "0", "--members", "full_size"])
    assert fake.pushes[1]["kernelDataSources"] == [f"tester/{NAME}"]


def test_a_second_kernel_resumes_from_the_first_ones_output(session):
    _, files, _, kaggle, env = session
    previous = kaggle / "input" / NAME
    for name, data in files.items():
        (previous / name).parent.mkdir(parents=True, exist_ok=True)
        (previous / name).write_bytes(data)
    # As a session cut short leaves them: a member's checkpoint (train.py resumes it when it matches the run).
    (previous / "paddy-pipeline/models/checkpoints/full_size").mkdir(parents=True)
    (previous / "paddy-pipeline/models/checkpoints/full_size/state.json").write_text("{}")
    shutil.rmtree(kaggle / "working")
    (kaggle / "working").mkdir()
    try:
        result = run_kernel(kaggle, kaggle_run.kernel_script(CFG, install=False), env)
    finally:
        shutil.rmtree(previous)
    assert result.returncode == 0, result.stdout[-5000:]
    assert "resuming from the previous run's output" in result.stdout
    # paddy_data: its links into the competition's mount are made again (forced); paddy_source: at every dvc repro
    assert set(RUNNING_STAGE.findall(result.stdout)) == {"paddy_data", "paddy_source"}  # the rest is restored
    assert (kaggle / "working/paddy-pipeline/models/checkpoints/full_size/state.json").is_file()


def test_no_wait_pushes_and_returns_and_collect_follows_it_later(session, fake, workspace):
    before = snapshot(workspace)
    fake.run = lambda push: Kernel(statuses=["RUNNING", "ERROR"], failure_message="out of disk")
    kaggle_run.main(["--profile", "demo", "--poll", "0", "--no-wait"])
    assert len(fake.pushes) == 1 and snapshot(workspace) == before
    with pytest.raises(SystemExit, match="ended with status error: out of disk"):
        kaggle_run.main(["--collect", "--poll", "0"])
    assert len(fake.pushes) == 1


def test_a_kernel_that_errors_changes_nothing_and_says_where_its_log_is(fake, workspace, capsys):
    before = snapshot(workspace)
    fake.run = lambda push: Kernel(statuses=["ERROR"], failure_message="CUDA out of memory", log="[traceback]")
    text = fails("ended with status error: CUDA out of memory", capsys)
    assert f".kaggle-run/{NAME}/download/{NAME}.log" in text and Path(f".kaggle-run/{NAME}/download/{NAME}.log").is_file()
    assert snapshot(workspace) == before


def test_a_cancelled_kernel_changes_nothing(fake, workspace, capsys):
    before = snapshot(workspace)
    fake.run = lambda push: Kernel(statuses=["RUNNING", "CANCEL_ACKNOWLEDGED"])
    fails("ended with status cancel_acknowledged", capsys)
    assert snapshot(workspace) == before


def test_a_kernel_still_running_when_the_wait_is_over_can_be_collected_later(fake, workspace, capsys):
    fake.run = lambda push: Kernel(statuses=["RUNNING"])
    fails("is still running after 0.0002 h", capsys)


def test_a_kernel_whose_hours_ran_out_changes_nothing_and_is_resumed_next_time(session, fake, workspace, capsys):
    before = snapshot(workspace)
    files = session[1] | {f"paddy-pipeline/{kaggle_run.MARKER}":
                          json.dumps({"finished": False, "stale": ["train@full_size"], "failed": None}).encode()}
    fake.run = lambda push: Kernel(statuses=["COMPLETE"], files=files)
    fails("stopped before the end (time is up; stale: train@full_size)", capsys)
    assert snapshot(workspace) == before


def test_a_kernel_with_no_outputs_changes_nothing(fake, workspace, capsys):
    before = snapshot(workspace)
    fake.run = lambda push: Kernel(statuses=["COMPLETE"], files={})
    fails("completed but left no outputs", capsys)
    assert snapshot(workspace) == before


def test_a_kernel_with_partial_outputs_changes_nothing(session, fake, workspace, capsys):
    before = snapshot(workspace)
    files = {name: data for name, data in session[1].items() if name != "paddy-pipeline/preds/full_size/valid.csv"}
    fake.run = lambda push: Kernel(statuses=["COMPLETE"], files=files)
    fails("output is partial: preds/full_size missing or incomplete", capsys)
    assert snapshot(workspace) == before


def test_missing_credentials_are_one_line(fake, workspace, monkeypatch, capsys):
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    fails("found no credentials", capsys)
    assert fake.bodies == []


def test_rules_not_accepted_are_one_line_with_the_rules_page(fake, workspace, capsys):
    fake.http_errors["SaveKernel"] = 403
    fails(f"accept the rules at https://www.kaggle.com/competitions/{COMPETITION}/rules", capsys)


def test_a_full_gpu_quota_is_the_clients_own_reason(fake, workspace, capsys):
    fake.push_error = "Maximum weekly GPU quota of 30.00 hours reached."
    fails("Kaggle refused the kernel push: Maximum weekly GPU quota of 30.00 hours reached.", capsys)


def test_the_code_archive_is_this_commit_with_the_run_params_and_lock_and_no_secret(tmp_path, session):
    workspace = session[0]
    with tarfile.open(kaggle_run.code_archive(tmp_path / "code.tar", workspace)) as tar:
        names = tar.getnames()
        assert {"Makefile", "dvc.yaml", "params.yaml", "dvc.lock", "notebooks/kaggle_run_kernel.py"} <= set(names)
        assert SECRET.encode() not in b"".join(tar.extractfile(member).read() for member in tar if member.isfile())

