"""Spec of the `ensemble` stage: weighted averaging, member checks, submissions and metrics.

The stage inside the real DAG (dvc repro, dvc metrics diff) is specified in test_dag.py.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import log_loss

from pipeline import ensemble as ensemble_stage
from pipeline.ensemble import (
    MemberPredsError,
    accuracy,
    fit_weights,
    resolve_weights,
    run,
    weighted_average,
)
from pipeline.paddy import CLASSES, fold_of, validation_mask
from pipeline.params import ParamsError
from pipeline.submission import SubmissionError

ROOT = Path(__file__).resolve().parents[1]
VOCAB = ["blast", "hispa"]  # the classes the tiny members hesitate between; the other eight get probability 0
TEST_IDS = ["t0.jpg", "t1.jpg"]
# train.csv's labels and the shared split params: validation_mask holds out rows 0, 1 and 5 (blast, blast, hispa).
TRAIN_LABELS = ["blast", "blast", "blast", "blast", "hispa", "hispa"]
VALIDATION = {"valid_pct": 0.5, "seed": 0, "full": False}
VALID_IDS = ["v0.jpg", "v1.jpg", "v2.jpg"]
VALID_LABELS = ["blast", "blast", "hispa"]
# Each member gets two of the three validation rows right; their average gets all three (a gain of 1/3).
MEMBER_VALID = {
    "alpha": [[0.9, 0.1], [0.9, 0.1], [0.6, 0.4]],
    "beta": [[0.4, 0.6], [0.8, 0.2], [0.1, 0.9]],
}
MEMBER_TEST = {"alpha": [[0.6, 0.4], [0.7, 0.3]], "beta": [[0.2, 0.8], [0.6, 0.4]]}


def class_table(probs, classes=CLASSES) -> pd.DataFrame:
    """Rows of probabilities over VOCAB spread over every class column (0 outside VOCAB), columns in `classes` order."""
    full = np.zeros((len(probs), len(CLASSES)))
    full[:, [CLASSES.index(label) for label in VOCAB]] = probs
    return pd.DataFrame(full, columns=list(CLASSES))[list(classes)]


def write_preds(preds_dir, member, classes=CLASSES, test_ids=TEST_IDS, valid_ids=VALID_IDS, labels=VALID_LABELS,
                valid_probs=None):
    """preds/<member>/{test,valid}.csv in the train stage's format, class columns in `classes` order."""
    out = Path(preds_dir) / member
    out.mkdir(parents=True, exist_ok=True)
    test = class_table(MEMBER_TEST[member], classes)
    test.insert(0, "image_id", test_ids)
    test.to_csv(out / "test.csv", index=False)
    valid = class_table(MEMBER_VALID[member] if valid_probs is None else valid_probs, classes)
    valid.insert(0, "label", labels)
    valid.insert(0, "image_id", valid_ids)
    valid.to_csv(out / "valid.csv", index=False)


def write_data(data_dir):
    """data/paddy's train.csv (validation rows named v0.jpg, v1.jpg, v2.jpg) and sample_submission.csv."""
    data_dir.mkdir(parents=True, exist_ok=True)
    held_out = validation_mask(TRAIN_LABELS, VALIDATION["valid_pct"], VALIDATION["seed"])
    valid_names, train_names = iter(VALID_IDS), iter(f"r{row}.jpg" for row in range(len(TRAIN_LABELS)))
    ids = [next(valid_names) if valid else next(train_names) for valid in held_out]
    train = pd.DataFrame({"image_id": ids, "label": TRAIN_LABELS, "variety": "ADT45", "age": 50})
    train.to_csv(data_dir / "train.csv", index=False)
    assert train[held_out]["label"].tolist() == VALID_LABELS
    pd.DataFrame({"image_id": TEST_IDS, "label": "blast"}).to_csv(data_dir / "sample_submission.csv", index=False)


def params_for(weights=None, fit=False, members=("alpha", "beta"), full=False):
    return {
        "profile": "demo",
        "validation": {**VALIDATION, "full": full},
        "train": {"members": {name: {} for name in members}},
        "ensemble": {"weights": weights or {}, "fit_weights": fit},
    }


@pytest.fixture
def workspace(tmp_path):
    """A project directory (the stage's own layout) holding both members' predictions and data/paddy's CSVs."""
    for member in MEMBER_VALID:
        write_preds(tmp_path / "preds", member)
    write_data(tmp_path / "data" / "paddy")
    return tmp_path


def run_in(workspace, params):
    return run(
        params,
        preds_dir=workspace / "preds",
        data_dir=workspace / "data" / "paddy",
        submissions_dir=workspace / "submissions",
        metrics_file=workspace / "metrics" / "ensemble.json",
    )


def main_in(workspace, monkeypatch, params) -> str:
    """`python -m pipeline.ensemble` in `workspace`: the one line it exits with."""
    (workspace / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(workspace)
    with pytest.raises(SystemExit) as stopped:
        ensemble_stage.main()
    message = str(stopped.value.code)
    assert "\n" not in message
    return message


def rewrite(csv_file, change):
    table = pd.read_csv(csv_file, dtype=str, keep_default_na=False)
    change(table).to_csv(csv_file, index=False)


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


@pytest.mark.parametrize("weight", [-1, float("nan")])
def test_a_negative_weight_is_an_error_naming_its_key(weight):
    with pytest.raises(ParamsError, match=r"^params.yaml: key 'ensemble.weights.beta' is (-1|nan); use a weight >= 0"):
        ensemble_stage.load_config(params_for(weights={"beta": weight}))


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
    # beta is confidently wrong on every validation row: fitted weights must leave the uniform start for alpha.
    beta_valid = [[0.2, 0.8], [0.2, 0.8], [0.8, 0.2]]
    write_preds(workspace / "preds", "beta", valid_probs=beta_valid)
    metrics = run_in(workspace, params_for(fit=True))
    weights = {name: metrics["members"][name]["weight"] for name in ("alpha", "beta")}
    assert sum(weights.values()) == pytest.approx(1)
    assert weights["alpha"] > 0.9 and weights["beta"] >= 0
    assert metrics["weights_fitted_on"] == "valid"

    def ensemble_log_loss(alpha_weight):
        probs = alpha_weight * np.asarray(MEMBER_VALID["alpha"]) + (1 - alpha_weight) * np.asarray(beta_valid)
        return log_loss(VALID_LABELS, probs, labels=VOCAB)

    assert ensemble_log_loss(weights["alpha"]) < ensemble_log_loss(0.5) - 0.1


def test_with_k_folds_every_training_row_is_scored_out_of_fold_with_each_folds_accuracy(workspace):
    # Two folds: each member's valid.csv is every row of train.csv, out of fold. alpha is right on the blast rows,
    # beta on the hispa rows, so each fold's accuracy is its share of either.
    train = pd.read_csv(workspace / "data" / "paddy" / "train.csv")
    blast = np.array(TRAIN_LABELS) == "blast"
    right = {"alpha": blast, "beta": ~blast}
    for member, is_right in right.items():
        probs = [[0.9, 0.1] if (label == "blast") == ok else [0.1, 0.9] for label, ok in zip(TRAIN_LABELS, is_right)]
        write_preds(workspace / "preds", member, valid_ids=train["image_id"], labels=TRAIN_LABELS, valid_probs=probs)
    params = params_for(fit=True)
    params["validation"] |= {"folds": 2, "fold_ids": [0, 1]}
    metrics = run_in(workspace, params)
    fold = fold_of(TRAIN_LABELS, 2, VALIDATION["seed"])
    assert (metrics["n_valid"], metrics["folds"], metrics["validated_on"]) == (len(TRAIN_LABELS), 2, "oof")
    assert metrics["weights_fitted_on"] == "oof"
    for member, is_right in right.items():
        assert metrics["members"][member]["valid_accuracy"] == pytest.approx(is_right.mean())
        each = {str(k): pytest.approx(is_right[fold == k].mean()) for k in (0, 1)}
        assert metrics["members"][member]["fold_accuracy"] == each
    assert set(metrics["ensemble"]["fold_accuracy"]) == {"0", "1"}


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
    write_preds(workspace / "preds", "beta", classes=CLASSES[::-1])
    metrics = run_in(workspace, params_for())
    assert metrics["ensemble"]["valid_accuracy"] == 1.0


def test_a_missing_member_names_the_stage_to_run(workspace):
    shutil.rmtree(workspace / "preds" / "beta")
    with pytest.raises(MemberPredsError, match=r"beta.*dvc repro train@beta"):
        run_in(workspace, params_for())


@pytest.mark.parametrize("members", [("alpha",), ("alpha", "beta")])
def test_a_class_that_is_not_the_competitions_is_an_error_naming_the_file(workspace, members):
    for member in members:
        for name in ("test.csv", "valid.csv"):
            rewrite(workspace / "preds" / member / name, lambda table: table.rename(columns={"normal": "rice_rust"}))
    with pytest.raises(MemberPredsError) as caught:
        run_in(workspace, params_for(members=members))
    assert str(caught.value).startswith(
        f"{workspace / 'preds' / 'alpha' / 'test.csv'}: column 'rice_rust' is not one of the competition's 10 classes"
    )
    assert not (workspace / "submissions").exists()


def test_members_with_other_test_ids_are_an_error_naming_the_file(workspace):
    write_preds(workspace / "preds", "beta", test_ids=["t0.jpg", "t9.jpg"])
    with pytest.raises(MemberPredsError, match=r"beta/test\.csv: test image ids differ"):
        run_in(workspace, params_for())


def test_members_with_other_validation_ids_are_an_error_naming_the_file(workspace):
    write_preds(workspace / "preds", "beta", valid_ids=["v0.jpg", "v1.jpg", "v9.jpg"])
    with pytest.raises(MemberPredsError, match=r"beta/valid\.csv: 1 image\(s\) of the shared validation split"):
        run_in(workspace, params_for())


def test_rows_that_do_not_sum_to_one_are_an_error_naming_the_file(workspace):
    test_file = workspace / "preds" / "alpha" / "test.csv"
    table = pd.read_csv(test_file)
    table["blast"] = 5.0
    table.to_csv(test_file, index=False)
    with pytest.raises(MemberPredsError, match=r"alpha/test\.csv: row 1 sums to"):
        run_in(workspace, params_for())


# The first member is the one an ensemble that compares members with each other takes for the reference, and so
# the one whose faults it would blame on the healthy others.
@pytest.mark.parametrize(
    "damaged, change, reported",
    [
        ("test.csv", lambda t: t.rename(columns={"hispa": "rice_rust"}), "column 'rice_rust' is not one of"),
        ("valid.csv", lambda t: t.assign(label=["blast", "hispa", "hispa"]), "image 'v1.jpg' is labelled 'hispa'"),
        ("valid.csv", lambda t: t.drop(index=1), "1 image(s) of the shared validation split are missing"),
        ("valid.csv", lambda t: t.assign(image_id=["v0.jpg", "r0.jpg", "v2.jpg"]), "1 image(s) of the shared"),
    ],
)
def test_a_fault_in_one_member_is_reported_against_its_own_file(workspace, damaged, change, reported):
    rewrite(workspace / "preds" / "alpha" / damaged, change)
    with pytest.raises(MemberPredsError) as caught:
        run_in(workspace, params_for())
    assert str(caught.value).startswith(f"{workspace / 'preds' / 'alpha' / damaged}: {reported}")


def test_validation_labels_are_checked_against_train_csv_not_against_the_members(workspace):
    # Both members agree with each other, and both disagree with the truth.
    for member in ("alpha", "beta"):
        rewrite(workspace / "preds" / member / "valid.csv", lambda t: t.assign(label=["blast", "blast", "blast"]))
    with pytest.raises(MemberPredsError, match=r"alpha/valid\.csv: image 'v2\.jpg' is labelled 'blast' where .*train\.csv says 'hispa'"):
        run_in(workspace, params_for())


def test_the_validation_split_comes_from_params(workspace):
    with pytest.raises(MemberPredsError, match=r"alpha/valid\.csv: .*shared validation split"):
        run_in(workspace, {**params_for(), "validation": {**VALIDATION, "valid_pct": 0.3}})


BINARY = bytes(range(256)) * 4


@pytest.mark.parametrize(
    "member_file, content, reported",
    [
        ("alpha/test.csv", b"", "not a readable CSV (EmptyDataError"),
        ("beta/valid.csv", BINARY, "not a readable CSV"),
        ("beta/test.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a readable CSV (UnicodeDecodeError"),
        ("alpha/valid.csv", None, "not a readable CSV (ParserError"),  # ragged: one row with a field too many
        ("alpha/test.csv", "longer", "not a readable CSV (rows have more fields than the header)"),
        ("beta/test.csv", "text", "row 2, column 'blast' holds 'high', not a probability"),
    ],
)
def test_an_unreadable_preds_csv_is_one_line_naming_it(workspace, monkeypatch, member_file, content, reported):
    path = workspace / "preds" / member_file
    if content is None:
        path.write_text(path.read_text() + "v9.jpg,blast" + ",0.1" * 11 + "\n")
    elif content == "longer":  # every row one field longer than the header: pandas would take an index column
        lines = path.read_text().splitlines()
        path.write_text("\n".join([lines[0]] + [line + ",0" for line in lines[1:]]) + "\n")
    elif content == "text":
        rewrite(path, lambda table: table.assign(blast=["0.6", "high"]))
    else:
        path.write_bytes(content)
    message = main_in(workspace, monkeypatch, params_for())
    assert message.startswith(f"ensemble: preds/{member_file}: {reported}")
    assert "dvc repro train@" in message


@pytest.mark.parametrize("content", [b"", BINARY, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"id;label\n1;2\n"])
def test_a_garbage_sample_submission_is_one_line_naming_it(workspace, monkeypatch, content):
    (workspace / "data" / "paddy" / "sample_submission.csv").write_bytes(content)
    message = main_in(workspace, monkeypatch, params_for())
    assert message.startswith("ensemble: data/paddy/sample_submission.csv: ")
    assert "dvc checkout data/paddy" in message
    with pytest.raises(SubmissionError):
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
    metrics = run_in(workspace, params_for(full=True))
    assert metrics["ensemble"]["valid_accuracy"] is None
    assert metrics["gain_over_best_member"] is None
    assert (workspace / "submissions" / "submission.csv").is_file()


def test_the_stage_depends_on_the_truth_it_checks_members_against():
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["ensemble"]
    assert "data/paddy/train.csv" in stage["deps"] and "data/paddy/sample_submission.csv" in stage["deps"]
    assert "validation" in stage["params"]
