"""Spec of the accuracy benchmark's data: real digit scans written in the competition's layout, test labels kept."""

import numpy as np
import pandas as pd

from benchmarks.accuracy import table, with_overrides, write_layout
from pipeline.paddy import CLASSES
from pipeline.paddy_data import verify_dataset


def test_the_layout_passes_the_paddy_data_checks_and_keeps_the_test_labels_out(tmp_path):
    digits = np.repeat(np.arange(10), 4)  # 4 images of each digit: 2 train, 2 held out
    images = np.random.default_rng(0).integers(0, 17, (len(digits), 8, 8))
    truth = write_layout(tmp_path, images, digits, test_pct=0.5, side=16)
    bad_files, _ = verify_dataset(tmp_path)
    assert bad_files == []
    assert sorted(truth) == sorted(path.name for path in (tmp_path / "test_images").iterdir())
    assert sorted(truth) == pd.read_csv(tmp_path / "sample_submission.csv", dtype=str)["image_id"].tolist()
    assert sorted(truth.values()) == sorted(np.repeat(CLASSES, 2))
    train = pd.read_csv(tmp_path / "train.csv", dtype=str)
    assert not set(train["image_id"]) & set(truth) and len(train) == 20


def test_an_override_of_folds_writes_their_fold_ids_as_make_profile_does():
    params = {"validation": {"folds": 1, "full": False, "fold_ids": []}, "train": {"member_defaults": {"lr": 0.004}}}
    changed = with_overrides(params, ["validation.folds=3", "train.member_defaults.lr=0.01"])
    assert changed["validation"]["fold_ids"] == [0, 1, 2] and changed["train"]["member_defaults"]["lr"] == 0.01
    assert params["validation"]["fold_ids"] == []


def test_the_table_sets_the_seeds_row_beside_ours_with_the_dag_seconds_on_the_ensemble():
    rows = {"resnet": {"valid_accuracy": 0.9, "test_accuracy": 0.91, "train_seconds": 10.0},
            "ensemble": {"valid_accuracy": 0.95, "test_accuracy": 0.96, "train_seconds": None, "dag_seconds": 30.0},
            "seeds train()": {"valid_accuracy": 0.93, "test_accuracy": 0.94, "train_seconds": 15.0}}
    lines = table({"rows": rows, "best_member": "resnet", "gain_over_best_member": 0.05}).splitlines()
    assert lines[0].split() == ["valid_accuracy", "test_accuracy", "seconds"]
    assert lines[2].split() == ["ensemble", "0.950", "0.960", "30.000"]
    assert lines[3].split() == ["seeds", "train()", "0.930", "0.940", "15.000"]
    assert lines[-1].endswith("(resnet): +0.050")
