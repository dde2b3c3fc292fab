"""Spec of the `ensemble` stage: weighted averaging, member checks, submissions and metrics.

The stage inside the real DAG (dvc repro, dvc metrics diff) is specified in test_dag.py.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.ensemble import (
    MemberPredsError,
    accuracy,
    fit_weights,
    resolve_weights,
    run,
    weighted_average,
)
from pipeline.params import ParamsError

VOCAB = ["blast", "hispa"]
TEST_IDS = ["t0.jpg", "t1.jpg"]
VALID_IDS = ["v0.jpg", "v1.jpg", "v2.jpg"]
VALID_LABELS = ["blast", "blast", "hispa"]
# Each member gets two of the three validation rows right; their average gets all three (a gain of 1/3).
MEMBER_VALID = {
    "alpha": [[0.9, 0.1], [0.9, 0.1], [0.6, 0.4]],
    "beta": [[0.4, 0.6], [0.8, 0.2], [0.1, 0.9]],
}
MEMBER_TEST = {"alpha": [[0.6, 0.4], [0.7, 0.3]], "beta": [[0.2, 0.8], [0.6, 0.4]]}


def write_preds(preds_dir, member, vocab=VOCAB, test_ids=TEST_IDS, valid_ids=VALID_IDS, labels=VALID_LABELS):
    """preds/<member>/{test,valid}.csv in the train stage's format, columns in `vocab` order."""
    out = Path(preds_dir) / member
    out.mkdir(parents=True, exist_ok=True)
    order = [VOCAB.index(label) for label in vocab]
    test = pd.DataFrame(np.asarray(MEMBER_TEST[member])[:, order], columns=vocab)
    test.insert(0, "image_id", test_ids)
    test.to_csv(out / "test.csv", index=False)
    valid = pd.DataFrame(np.asarray(MEMBER_VALID[member])[:, order], columns=vocab)
    valid.insert(0, "label", labels)
    valid.insert(0, "image_id", valid_ids)
    valid.to_csv(out / "valid.csv", index=False)


def params_for(weights=None, fit=False, members=("alpha", "beta")):
    return {
        "profile": "demo",
        "train": {"members": {name: {} for name in members}},
        "ensemble": {"weights": weights or {}, "fit_weights": fit},
    }


@pytest.fixture
def workspace(tmp_path):
    """A project directory holding both members' predictions and a sample submission."""
    for member in MEMBER_VALID:
        write_preds(tmp_path / "preds", member)
    pd.DataFrame({"image_id": TEST_IDS, "label": "blast"}).to_csv(tmp_path / "sample_submission.csv", index=False)
    return tmp_path


def run_in(workspace, params):
    return run(
        params,
        preds_dir=workspace / "preds",
        sample_file=workspace / "sample_submission.csv",
        submissions_dir=workspace / "submissions",
        metrics_file=workspace / "metrics" / "ensemble.json",
    )


def test_weighted_average_divides_by_the_sum_of_weights():
    averaged = weighted_average([np.array([[0.6, 0.4]]), np.array([[0.2, 0.8]])], [1, 3])
    np.testing.assert_allclose(averaged, [[0.3, 0.7]])


def test_weighted_average_with_a_zero_weight_is_the_other_member():
    averaged = weighted_average([np.array([[0.6, 0.4]]), np.array([[0.2, 0.8]])], [0, 2])
    np.testing.assert_allclose(averaged, [[0.2, 0.8]])


def test_members_not_listed_in_weights_weigh_one():
    assert resolve_weights(["alpha", "beta"], {"alpha": 2}) == {"alpha": 2.0, "beta": 1.0}


def test_a_weight_for_a_member_that_is_not_trained_is_an_error():
    with pytest.raises(ParamsError, match=r"ensemble\.weights\.gamma"):
        resolve_weights(["alpha", "beta"], {"gamma": 1})


def test_all_zero_weights_are_an_error():
    with pytest.raises(ParamsError, match="every weight is 0"):
        resolve_weights(["alpha", "beta"], {"alpha": 0, "beta": 0})


def test_accuracy_is_none_without_validation_rows():
    assert accuracy(np.zeros((0, 2)), [], VOCAB) is None


def test_stage_writes_member_and_ensemble_submissions_in_sample_order(workspace):
    run_in(workspace, params_for())
    ensemble = pd.read_csv(workspace / "submissions" / "submission.csv")
    alpha = pd.read_csv(workspace / "submissions" / "members" / "alpha.csv")
    beta = pd.read_csv(workspace / "submissions" / "members" / "beta.csv")
    assert ensemble.to_dict("list") == {"image_id": TEST_IDS, "label": ["hispa", "blast"]}
    assert alpha["label"].tolist() == ["blast", "blast"]
    assert beta["label"].tolist() == ["hispa", "blast"]


def test_metrics_record_each_member_the_ensemble_and_the_gain(workspace):
    run_in(workspace, params_for())
    metrics = json.loads((workspace / "metrics" / "ensemble.json").read_text())
    assert metrics["profile"] == "demo"
    assert metrics["members"]["alpha"] == {"valid_accuracy": pytest.approx(2 / 3), "weight": 1.0}
    assert metrics["members"]["beta"]["valid_accuracy"] == pytest.approx(2 / 3)
    assert metrics["ensemble"]["valid_accuracy"] == 1.0
    assert metrics["best_member"] == "alpha"
    assert metrics["gain_over_best_member"] == pytest.approx(1 / 3, abs=1e-6)
    assert metrics["weights_fitted_on"] is None


def test_weights_from_params_change_the_ensemble(workspace):
    metrics = run_in(workspace, params_for(weights={"alpha": 1, "beta": 0}))
    assert metrics["ensemble"]["valid_accuracy"] == pytest.approx(2 / 3)
    labels = pd.read_csv(workspace / "submissions" / "submission.csv")["label"].tolist()
    assert labels == ["blast", "blast"]


def test_fitted_weights_are_recorded_and_flagged_as_fitted_on_valid(workspace):
    metrics = run_in(workspace, params_for(fit=True))
    weights = [metrics["members"][name]["weight"] for name in ("alpha", "beta")]
    assert sum(weights) == pytest.approx(1)
    assert all(weight >= 0 for weight in weights)
    assert metrics["weights_fitted_on"] == "valid"


def test_fitted_weights_favour_the_better_member():
    labels = ["blast", "hispa"]
    good = np.array([[0.9, 0.1], [0.1, 0.9]])
    bad = np.array([[0.2, 0.8], [0.8, 0.2]])
    good_weight, bad_weight = fit_weights([good, bad], labels, VOCAB)
    assert good_weight > 0.9 > 0.1 > bad_weight


def test_fit_weights_without_validation_rows_is_an_error():
    with pytest.raises(ParamsError, match="validation.full"):
        fit_weights([np.zeros((0, 2))], [], VOCAB)


def test_members_with_columns_in_another_order_are_realigned(workspace):
    write_preds(workspace / "preds", "beta", vocab=["hispa", "blast"])
    metrics = run_in(workspace, params_for())
    assert metrics["ensemble"]["valid_accuracy"] == 1.0


def test_a_missing_member_names_the_stage_to_run(workspace):
    shutil.rmtree(workspace / "preds" / "beta")
    with pytest.raises(MemberPredsError, match=r"beta.*dvc repro train@beta"):
        run_in(workspace, params_for())


def test_members_with_different_classes_are_an_error_naming_the_file(workspace):
    for name in ("test.csv", "valid.csv"):
        pred_file = workspace / "preds" / "beta" / name
        pd.read_csv(pred_file).rename(columns={"hispa": "normal"}).to_csv(pred_file, index=False)
    with pytest.raises(MemberPredsError, match=r"beta/test\.csv: classes differ"):
        run_in(workspace, params_for())


def test_members_with_other_test_ids_are_an_error_naming_the_file(workspace):
    write_preds(workspace / "preds", "beta", test_ids=["t0.jpg", "t9.jpg"])
    with pytest.raises(MemberPredsError, match=r"beta/test\.csv: test image ids differ"):
        run_in(workspace, params_for())


def test_members_with_other_validation_ids_are_an_error_naming_the_file(workspace):
    write_preds(workspace / "preds", "beta", valid_ids=["v0.jpg", "v1.jpg", "v9.jpg"])
    with pytest.raises(MemberPredsError, match=r"beta/valid\.csv: validation ids differ"):
        run_in(workspace, params_for())


def test_rows_that_do_not_sum_to_one_are_an_error_naming_the_file(workspace):
    test_file = workspace / "preds" / "alpha" / "test.csv"
    table = pd.read_csv(test_file)
    table["blast"] = 5.0
    table.to_csv(test_file, index=False)
    with pytest.raises(MemberPredsError, match=r"alpha/test\.csv: row 1 sums to"):
        run_in(workspace, params_for())


def test_a_failed_check_leaves_previous_submissions_untouched(workspace):
    run_in(workspace, params_for())
    before = (workspace / "submissions" / "submission.csv").read_text()
    write_preds(workspace / "preds", "beta", test_ids=["t0.jpg", "t9.jpg"])
    with pytest.raises(MemberPredsError):
        run_in(workspace, params_for(weights={"beta": 3}))
    assert (workspace / "submissions" / "submission.csv").read_text() == before


def test_full_training_without_validation_rows_still_writes_submissions(workspace):
    for member in MEMBER_VALID:
        valid_file = workspace / "preds" / member / "valid.csv"
        valid_file.write_text(valid_file.read_text().splitlines()[0] + "\n")
    metrics = run_in(workspace, params_for())
    assert metrics["ensemble"]["valid_accuracy"] is None
    assert metrics["gain_over_best_member"] is None
    assert (workspace / "submissions" / "submission.csv").is_file()
