"""atomic_path: a target is replaced whole or not at all, and a killed writer's scratch folder does not stay forever."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.common import NoSpaceError, atomic_path

ROOT = Path(__file__).resolve().parents[1]
# A writer that stops in the middle of writing `target` (argv[1]) until it is killed.
WRITER = """
import sys, time
from pipeline.common import atomic_path
with atomic_path(sys.argv[1]) as staging:
    staging.mkdir()
    (staging / "half.bin").write_bytes(bytes(1 << 20))
    print("writing", flush=True)
    time.sleep(120)
"""


def _scratch(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.*.partial"))


def _write_complete(target: Path) -> None:
    with atomic_path(target) as staging:
        staging.mkdir()
        (staging / "whole.txt").write_text("complete")


def test_a_failed_writer_leaves_the_previous_target_and_no_scratch(tmp_path):
    target = tmp_path / "paddy"
    _write_complete(target)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as staging:
            staging.mkdir()
            raise RuntimeError("disk full")
    assert (target / "whole.txt").read_text() == "complete"
    assert _scratch(target) == []


def test_the_scratch_folder_of_a_writer_killed_mid_write_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "paddy"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    [left] = _scratch(target)
    assert str(writer.pid) in left.name

    _write_complete(target)

    assert _scratch(target) == []
    assert (target / "whole.txt").read_text() == "complete"


def test_the_scratch_folder_of_a_running_writer_is_left_alone(tmp_path):
    target = tmp_path / "paddy"
    # This very process is alive, so a scratch folder carrying its pid belongs to a writer still at work.
    running = tmp_path / f".paddy.{os.getpid()}.k3x9a0zq.partial"
    (running / "paddy").mkdir(parents=True)
    _write_complete(target)
    assert _scratch(target) == [running]


def test_scratch_folders_of_other_targets_are_left_alone(tmp_path, dead_pid):
    of_another_target = tmp_path / f".movielens.{dead_pid}.k3x9a0zq.partial"
    of_another_target.mkdir()
    _write_complete(tmp_path / "paddy")
    assert of_another_target.is_dir()


# A writer killed (kill -9) between the two renames of a directory swap: the old copy is moved aside, the new one
# not yet in place.
KILLED_MID_SWAP = """
import os, signal, sys
from pipeline.common import atomic_path
replace = os.replace
def replace_then_die(source, destination):
    replace(source, destination)
    os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace_then_die
with atomic_path(sys.argv[1]) as staging:
    staging.mkdir()
    (staging / "whole.txt").write_text("new")
"""


def test_a_writer_killed_between_the_renames_of_a_directory_swap_loses_nothing(tmp_path):
    target = tmp_path / "paddy"
    _write_complete(target)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_SWAP, str(target)], env=env)
    assert killed.returncode == -signal.SIGKILL and not target.exists()  # the window: only the scratch copy left

    with pytest.raises(RuntimeError):  # the next write on the target puts the old copy back, even if it fails
        with atomic_path(target):
            raise RuntimeError("the next writer fails too")

    assert (target / "whole.txt").read_text() == "complete"
    assert _scratch(target) == []


def test_a_full_disk_is_one_line_naming_the_target_and_how_dvc_restores_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_STAGE", "paddy_data")
    with pytest.raises(NoSpaceError) as err:
        with atomic_path(tmp_path / "paddy") as staging:
            raise OSError(errno.ENOSPC, "No space left on device", str(staging / "train.csv"))
    assert re.fullmatch(
        rf"{tmp_path / 'paddy'}: no space left on device \(\d+\.\d MiB free there\); free some space and run again; "
        r"`dvc checkout paddy_data` brings back the outputs DVC removed before the run",
        str(err.value),
    )
    assert _scratch(tmp_path / "paddy") == []
