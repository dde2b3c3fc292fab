"""`validation.folds: 2` under `dvc repro` in a scratch clone: one fold@<member>-<k> stage per member and fold, each
member gathered by train@<member>, the ensemble scored (and its weights fitted) on out-of-fold predictions.

The tiny params of test_dag.py (32 px, one epoch), run by `make train-parallel JOBS=2` (folds first, then gathers),
from the demo run's copy taken before any member stage ran: the data and collab are not rebuilt.
"""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest

from helpers import copy_repo, edit_params, members_of, run, stages_run

pytestmark = pytest.mark.slow

FOLDS = {"validation.folds": 2, "validation.fold_ids": [0, 1], "ensemble.fit_weights": True}


@pytest.fixture(scope="module")
def folds_run(demo_run, tmp_path_factory):
    repo = copy_repo(demo_run.before_probes, tmp_path_factory.mktemp("folds") / "repo")
    edit_params(repo, FOLDS)
    run(repo, "git", "commit", "--quiet", "-am", "2 folds")
    # make train-parallel: two folds at a time, then the gathers, then `dvc repro` (the ensemble)
    ran = stages_run(run(repo, "make", "train-parallel", "JOBS=2", f"PYTHON={sys.executable}").stdout)
    run(repo, "git", "add", "--all")
    run(repo, "git", "commit", "--quiet", "-m", "2-fold DAG run")
    return repo, ran


def read_json(path):
    return json.loads(path.read_text())


def test_each_member_trains_one_stage_per_fold_and_its_train_stage_gathers_them(folds_run):
    repo, ran = folds_run
    members = members_of(repo)
    folds = [f"fold@{m}-{k}" for m in members for k in (0, 1)]
    assert set(folds) | {f"train@{m}" for m in members} | {f"probe@{m}" for m in members} <= set(ran)
    assert sum(stage.startswith("probe@") for stage in ran) == len(members)  # probed once per member, not per fold
    n_train = len(pd.read_csv(repo / "data/paddy/train.csv"))
    for member in members:
        oof = pd.read_csv(repo / "preds" / member / "valid.csv")
        assert len(oof) == n_train  # every training image, out of fold
        metrics = read_json(repo / "metrics/train" / f"{member}.json")
        assert metrics["validated_on"] == "oof" and set(metrics["fold_accuracy"]) == {"0", "1"}
        assert (repo / "metrics/train/folds" / f"{member}-1.json").is_file()


def test_the_ensemble_reports_oof_accuracy_per_fold_and_fits_its_weights_on_oof(folds_run):
    repo, _ = folds_run
    metrics = read_json(repo / "metrics/ensemble.json")
    assert metrics["n_valid"] == len(pd.read_csv(repo / "data/paddy/train.csv"))
    assert (metrics["folds"], metrics["validated_on"], metrics["weights_fitted_on"]) == (2, "oof", "oof")
    assert set(metrics["ensemble"]["fold_accuracy"]) == {"0", "1"}
    assert "ensemble.fold_accuracy_std" in run(repo, "dvc", "metrics", "show").stdout  # the CV figures, flattened


def test_a_second_repro_runs_nothing(folds_run):
    repo, _ = folds_run
    assert stages_run(run(repo, "dvc", "repro").stdout) == []
    assert run(repo, "git", "status", "--porcelain").stdout == ""


def test_changing_one_member_retrains_only_its_folds(folds_run, tmp_path_factory):
    repo = copy_repo(folds_run[0], tmp_path_factory.mktemp("folds_changed") / "repo")
    member, *others = members_of(repo)
    edit_params(repo, {f"train.members.{member}.epochs": 2})
    ran = stages_run(run(repo, "dvc", "repro", "ensemble").stdout)
    assert {f"fold@{member}-0", f"fold@{member}-1", f"train@{member}", "ensemble"} <= set(ran)
    untouched = [f"{kind}@{other}" for other in others for kind in ("fold", "probe")]
    assert not [stage for stage in ran if stage.startswith(tuple(untouched))]
    diff = json.loads(run(repo, "dvc", "metrics", "diff", "--json").stdout)
    assert diff[f"metrics/train/folds/{member}-0.json"]["epochs"] == {"old": 1, "new": 2, "diff": 1}
