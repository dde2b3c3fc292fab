"""Spec of `make rehearsal`'s pure parts: its params, its data size, its one-line errors and summary lines, its copy.

The rehearsal itself (the competition DAG on full-size photos) is a benchmark, not a test: `make rehearsal`.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pandas as pd
import pytest

from benchmarks.rehearsal import (
    STEPS_PER_EPOCH,
    MemberRun,
    generated_split,
    memory_comparison,
    probe_accums_for,
    rehearsal_params,
    summary_line,
)
from benchmarks import WorkspaceError, copy_repo, error_line, run_stage
from helpers import GIT_IDENTITY
from pipeline.paddy import CLASSES, validation_mask
from pipeline.profile import render_params
from pipeline.synthetic import write_synthetic_dataset
from pipeline.vision import load_train_config

COMPETITION = render_params("competition")
MEMBERS = list(COMPETITION["train"]["members"])


def test_every_member_keeps_its_architecture_transforms_and_schedule():
    rehearsed = load_train_config(rehearsal_params(COMPETITION, MEMBERS, 8)).members
    real = load_train_config(COMPETITION).members
    for name in MEMBERS:
        for key in ("arch", "resize", "method", "size", "schedule", "lr", "targets", "accum", "min_scale"):
            assert getattr(rehearsed[name], key) == getattr(real[name], key), (name, key)


def test_members_train_one_epoch_from_random_weights_on_generated_full_size_photos():
    params = rehearsal_params(COMPETITION, MEMBERS, 8)
    assert params["data"]["source"] == "synthetic"
    assert params["data"]["synthetic"]["image_size"] == [480, 640]
    for member in load_train_config(params).members.values():
        assert (member.pretrained, member.epochs, member.max_steps_per_epoch) == (False, 1, STEPS_PER_EPOCH)


def test_a_member_that_sets_its_own_epochs_and_weights_is_capped_too():
    profile = copy.deepcopy(COMPETITION)
    profile["train"]["members"][MEMBERS[0]] |= {"epochs": 12, "pretrained": True}
    member = load_train_config(rehearsal_params(profile, MEMBERS, 8)).members[MEMBERS[0]]
    assert (member.pretrained, member.epochs) == (False, 1)


def test_a_subset_of_members_keeps_only_their_stages_and_ensemble_weights():
    chosen = [MEMBERS[2], MEMBERS[0]]
    params = rehearsal_params(COMPETITION, chosen, 8)
    assert list(params["train"]["members"]) == [MEMBERS[0], MEMBERS[2]]  # the profile's order
    assert set(params["ensemble"]["weights"]) == set(chosen)


def test_batch_size_is_set_and_the_profile_is_left_alone():
    params = rehearsal_params(COMPETITION, MEMBERS, 4)
    assert params["train"]["bs"] == 4 and params["train"]["precision"] == COMPETITION["train"]["precision"]
    assert COMPETITION["train"]["bs"] == 64 and COMPETITION["data"]["source"] == "kaggle"
    assert COMPETITION["probe"]["accums"] == [1, 2, 4] and COMPETITION["validation"]["valid_pct"] == 0.2


def test_probe_measures_only_the_accums_leaving_two_images_per_step():
    assert probe_accums_for([1, 2, 4], 64) == [1, 2, 4]
    assert probe_accums_for([1, 2, 4], 4) == [1, 2]
    assert rehearsal_params(COMPETITION, MEMBERS, 4)["probe"]["accums"] == [1, 2]


def test_a_batch_too_small_for_every_accum_is_refused_with_the_smallest_usable():
    with pytest.raises(WorkspaceError, match="use --bs 2 or more"):
        probe_accums_for([1, 2, 4], 1)


@pytest.mark.parametrize("bs", [4, 64])
def test_generated_data_has_one_validation_image_per_class_and_two_full_batches(bs, tmp_path):
    per_class, valid_pct = generated_split(bs)
    # Tiny images: the counts are the generator's, whatever the size.
    write_synthetic_dataset(tmp_path, train_per_class=per_class, n_test=1, image_size=(16, 16), seed=0)
    labels = pd.read_csv(tmp_path / "train.csv")["label"]
    is_valid = validation_mask(labels, valid_pct, seed=42)  # stratified: fails without a validation image per class
    assert sorted(labels[is_valid]) == sorted(CLASSES)
    assert (~is_valid).sum() >= 2 * bs
    assert labels.value_counts().min() >= 2  # the probe's smallest class


def test_generated_split_is_the_fewest_images_at_a_cpu_batch():
    assert generated_split(4) == (4, 0.25)  # 38 images: the smallest class's 2 are the probe's minimum


def test_error_of_a_traceback_is_its_exception_not_dvcs_summary():
    lines = [
        "[probe] swin_large_224: swin_large_patch4_window7_224, 8 images per step (accum=1) ...",
        "probe: the fit at accum=1 failed in its child process:",
        "Traceback (most recent call last):",
        '  File "/x/probe.py", line 200, in _measure_in_child',
        "    raise RuntimeError(message)",
        "RuntimeError: running_mean should contain 14 elements not 3072",
        "ERROR: failed to reproduce 'probe@swin_large_224': failed to run: python -m pipeline.probe swin_large_224, "
        "exited with 1",
    ]
    assert error_line(lines, 1) == "RuntimeError: running_mean should contain 14 elements not 3072"


def test_error_of_a_stage_refusal_is_its_one_line():
    lines = ["[train] a: starting", "train: data/paddy/train.csv: not found; run `dvc repro paddy_data` first",
             "ERROR: failed to reproduce 'train@a': failed to run: python -m pipeline.train a, exited with 1"]
    assert error_line(lines, 1) == "train: data/paddy/train.csv: not found; run `dvc repro paddy_data` first"


def test_error_of_a_process_killed_without_a_word_is_dvcs_line():
    lines = ["[train] a: resnet, accum 1", "ERROR: failed to reproduce 'train@a': failed to run: python -m "
             "pipeline.train a, exited with -9"]
    assert error_line(lines, 1).endswith("exited with -9")
    assert error_line([], 137) == "exited with code 137"


def test_error_is_one_line_of_bounded_length():
    assert error_line(["ValueError: " + "x " * 1000], 1).count("\n") == 0
    assert len(error_line(["ValueError: " + "x" * 1000], 1)) <= 300


def test_summary_line_shows_stage_times_accum_and_ok():
    line = summary_line(MemberRun("vit_large_640", probe_seconds=61.04, train_seconds=180.0, accum=2), 16)
    assert line.startswith("vit_large_640   ")
    assert "probe   61.0 s" in line and "train  180.0 s" in line and "accum 2" in line
    assert line.endswith("ok")


def test_summary_line_of_a_failed_member_ends_with_its_error():
    line = summary_line(MemberRun("swin_large_224", probe_seconds=40.0, error="train: RuntimeError: boom"))
    assert "train        - " in line and "accum -" in line
    assert line.endswith("error: train: RuntimeError: boom")


def test_summary_line_says_where_the_killed_run_resumed():
    run = MemberRun("a", probe_seconds=1.0, train_seconds=2.0, accum=1, killed_after_epoch=1, resumed_from_epoch=1)
    assert "killed after epoch 1, resumed from 1" in summary_line(run)


def test_the_workspace_copy_never_takes_ignored_files(tmp_path):
    repo, workdir = tmp_path / "repo", tmp_path / "work"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "big.jpg").write_text("the user's data")
    (repo / ".gitignore").write_text("/data/\n")
    (repo / "tracked.py").write_text("x = 1\n")
    (repo / "new.py").write_text("y = 2\n")
    env = {**os.environ, **GIT_IDENTITY}
    for command in (["git", "init", "-q"], ["git", "add", ".gitignore", "tracked.py"], ["git", "commit", "-qm", "x"]):
        subprocess.run(command, cwd=repo, env=env, check=True)
    workdir.mkdir()
    assert copy_repo(repo, workdir) == 3
    assert sorted(p.name for p in workdir.iterdir()) == [".gitignore", "new.py", "tracked.py"]


@pytest.fixture
def stage_repo(tmp_path):
    """A git + DVC repository whose stages stand in for the real ones: one that writes a marker, then waits to be
    killed; one that fails with its own one-line error."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "slow.py").write_text("import time\nopen('started', 'w').close()\ntime.sleep(60)\n")
    (repo / "refuses.py").write_text("import sys\nprint('[refuses] working')\nsys.exit('refuses: bad.txt: fix it')\n")
    (repo / "dvc.yaml").write_text("stages:\n  slow:\n    cmd: python slow.py\n  refuses:\n    cmd: python refuses.py\n")
    env = {**os.environ, **GIT_IDENTITY}
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(command, cwd=repo, env=env, check=True)
    return repo


def test_a_stage_is_killed_when_asked_and_a_failing_one_reports_its_own_line(stage_repo, tmp_path):
    killed = run_stage(stage_repo, "slow", tmp_path / "slow.log", kill_when=lambda: (stage_repo / "started").exists())
    assert killed.killed and killed.error is None and killed.seconds < 30
    failed = run_stage(stage_repo, "refuses", tmp_path / "refuses.log")
    assert (failed.killed, failed.error) == (False, "refuses: bad.txt: fix it")
    assert "refuses: bad.txt: fix it" in (tmp_path / "refuses.log").read_text()


def test_cuda_memory_compares_reserved_peaks_at_the_accum_train_used():
    probe_metrics = {"peaks": {"1": {"peak_gib": 20.0, "peak_reserved_gib": 20.0},
                               "2": {"peak_gib": 10.0, "peak_reserved_gib": 10.0}}}
    train_metrics = {"device": "cuda:0", "peak_reserved_gib": 10.5}
    assert memory_comparison(probe_metrics, train_metrics, 2) == {"probe_gib": 10.0, "train_gib": 10.5, "ratio": 1.05}
    assert "peak 10.00 GiB probe / 10.50 train" in summary_line(
        MemberRun("m", memory=memory_comparison(probe_metrics, train_metrics, 2)))


def test_memory_without_both_cuda_peaks_is_not_compared():
    assert memory_comparison({"peaks": {"1": {"peak_reserved_gib": 1.0}}}, {"device": "cuda:0"}, 1) is None
    assert memory_comparison({"peaks": {"1": {"peak_gib": 4.0}}}, {"device": "cpu", "peak_reserved_gib": None}, 1) is None
