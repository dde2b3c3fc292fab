"""common.stage_main, every stage's main(): one line for its own errors and for an interrupt, bugs raise as
themselves, and a stage stops when the `dvc repro` that started it is killed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.common import stage_main

ROOT = Path(__file__).resolve().parents[1]

# paddy_data's main, its generator replaced by one that writes half a dataset into atomic_path's scratch folder and
# then waits to be interrupted.
SLOW_PADDY_DATA = """
import sys, time
from pipeline import paddy_data

def half_written(staging, **kwargs):
    (staging / "train_images").mkdir(parents=True)
    print("writing", flush=True)
    time.sleep(120)

paddy_data.write_synthetic_dataset = half_written
paddy_data.main()
"""


def _project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    (project / "data" / "paddy").mkdir(parents=True)
    (project / "data" / "paddy" / "SOURCE.json").write_text("{}\n")  # the previous data
    shutil.copy(ROOT / "params.yaml", project / "params.yaml")
    return project


def _start(command: list[str], cwd: Path, **env_vars: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1", **env_vars}
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_an_interrupted_paddy_data_says_one_line_and_leaves_no_scratch_folder(tmp_path, signum, code):
    project = _project(tmp_path)
    stage = _start([sys.executable, "-c", SLOW_PADDY_DATA], project)
    assert stage.stdout.readline() == "writing\n"
    stage.send_signal(signum)
    _, stderr = stage.communicate(timeout=60)
    last = stderr.strip().splitlines()[-1]
    assert stage.returncode == code
    assert "Traceback" not in stderr
    assert last.startswith(f"[paddy_data] interrupted ({signal.Signals(signum).name}); the previous outputs are kept")
    assert sorted(path.name for path in (project / "data").iterdir()) == ["paddy"]  # no .partial folder
    assert (project / "data" / "paddy" / "SOURCE.json").read_text() == "{}\n"


@pytest.mark.slow
# dvc runs the cmd with $SHELL -c: bash execs the command (the stage is dvc's child), dash (/bin/sh here, and what dvc
# uses where SHELL is unset, as under CI) forks it (the stage is the shell's child, and the shell outlives dvc).
@pytest.mark.parametrize("shell", ["/bin/bash", "/bin/sh"])
def test_a_stage_stops_when_the_dvc_repro_that_runs_it_is_killed(tmp_path, shell):
    project = _project(tmp_path)
    (project / "slow_paddy_data.py").write_text(SLOW_PADDY_DATA)
    (project / "dvc.yaml").write_text(
        "stages:\n  paddy_data:\n    cmd: python slow_paddy_data.py\n    outs:\n      - data/paddy:\n"
        "          persist: true\n"
    )
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=project, check=True)
    dvc = _start(["dvc", "repro"], project, SHELL=shell)
    while dvc.stdout.readline() != "writing\n":
        pass
    [stage] = _running_script(psutil.Process(dvc.pid), "slow_paddy_data.py")
    dvc.send_signal(signal.SIGTERM)  # to dvc alone: it dies without passing the signal on
    dvc.wait()
    try:
        assert psutil.wait_procs([stage], timeout=30)[1] == [], "the stage outlived its dvc repro"
    finally:
        _kill_if_running([stage])
    time.sleep(0.5)  # psutil saw it go; its clean-up is done before it exits
    assert sorted(path.name for path in (project / "data").iterdir()) == ["paddy"]


@pytest.mark.slow
def test_a_probe_stopped_by_sigterm_stops_its_measuring_child_too(tmp_path):
    fit = "open('measuring', 'w').close(); import time; time.sleep(300)"
    measuring = (
        "import functools; from pipeline import probe; from pipeline.common import stage_main\n"
        f"stage_main('probe')(probe.peak_rss_in_child)(functools.partial(exec, {fit!r}), 'accum=1')\n"
    )
    stage = _start([sys.executable, "-c", measuring], tmp_path)
    deadline = time.monotonic() + 300  # the child imports fastai and timm: minutes on a loaded 2-core machine
    while not (tmp_path / "measuring").exists():
        assert time.monotonic() < deadline and stage.poll() is None, "the measuring child never started"
        time.sleep(0.5)
    descendants = psutil.Process(stage.pid).children(recursive=True)
    stage.send_signal(signal.SIGTERM)
    try:
        _, stderr = stage.communicate(timeout=30)
        assert stage.returncode == 143 and "[probe] interrupted (SIGTERM)" in stderr
        assert psutil.wait_procs(descendants, timeout=30)[1] == [], "the measuring child outlived the probe"
    finally:
        _kill_if_running([psutil.Process(stage.pid), *descendants] if stage.poll() is None else descendants)


def _running_script(parent: psutil.Process, script: str) -> list[psutil.Process]:
    """The descendants of `parent` that run `script` with Python. dvc has other children at times (the shell it runs the
    command with, its updater daemon), so the stage is picked by its command line, not by being the only child."""
    found = []
    for child in parent.children(recursive=True):
        try:
            if child.cmdline()[-1:] == [script]:
                found.append(child)
        except psutil.Error:  # a short-lived child that exited meanwhile
            pass
    return found


def _kill_if_running(processes: list[psutil.Process]) -> None:
    """A failed test leaves no sleeping stage behind."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


class StageFault(ValueError):
    pass


def test_a_stage_error_is_one_line_and_a_bug_raises_with_its_traceback():
    @stage_main("demo", StageFault)
    def fails(error):
        raise error

    with pytest.raises(SystemExit, match=r"^demo: params.yaml: key 'x' is bad; fix it$") as exit_info:
        fails(StageFault("params.yaml: key 'x' is bad; fix it"))
    assert exit_info.value.__cause__ is None and exit_info.value.__suppress_context__
    with pytest.raises(KeyError):
        fails(KeyError("a bug"))


def test_stage_main_restores_the_sigterm_handler_it_replaced():
    before = signal.getsignal(signal.SIGTERM)
    stage_main("demo")(lambda: None)()
    assert signal.getsignal(signal.SIGTERM) is before
