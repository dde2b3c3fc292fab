"""Stage `ensemble`: average the members' TTA probabilities and write the submissions (docs/stages.md#ensemble).

Every member is checked against the truth before anything is written; with `validation.folds` K > 1 the validation
rows are every training image's out-of-fold (OOF) prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from pipeline.common import atomic_path, log, read_csv, stage_main, write_json
from pipeline.paddy import CLASSES, DATA_DIR, ValidationConfig, sample_submission_csv, train_csv, validation_rows
from pipeline.params import Check, ParamsError, load_section, profile_of, read_params
from pipeline.submission import (SubmissionError, build_submission, read_sample_submission, validate_submission,
                                 write_submission_csv)

STAGE = "ensemble"
PREDS_DIR = Path("preds")
SUBMISSIONS_DIR = Path("submissions")
METRICS_FILE = Path("metrics/ensemble.json")
FIT_NEEDS_VALIDATION = ("params.yaml: key 'ensemble.fit_weights' needs a validation set, but validation.full is "
                        "true; set one of them to false")
# Rows of TTA probabilities sum to 1 up to the rounding of the CSV they were written to.
PROB_SUM_TOLERANCE = 1e-3
Weight = Annotated[float, Check(lambda weight: weight >= 0, "use a weight >= 0")]


@dataclass(frozen=True)
class EnsembleConfig:
    weights: dict[str, Weight] = field(default_factory=dict)  # members not listed weigh 1
    fit_weights: bool = False


@dataclass(frozen=True)
class StageConfig:
    """Everything this stage reads from params.yaml."""

    profile: str  # recorded in the metrics
    weights: dict[str, float]  # every member's weight, in the order of train.members
    fit_weights: bool
    validation: ValidationConfig  # the shared split each member's validation predictions are checked against


def load_config(params: Mapping) -> StageConfig:
    config = load_section(EnsembleConfig, params, "ensemble")
    validation = load_section(ValidationConfig, params, "validation")
    if config.fit_weights and validation.full:
        raise ParamsError(FIT_NEEDS_VALIDATION)
    # The ensemble's members: the keys of params `train.members`, in the order written there.
    members = params.get("train", {}).get("members") if isinstance(params.get("train"), Mapping) else None
    if not isinstance(members, Mapping) or not members:
        raise ParamsError("params.yaml: key 'train.members' must be a non-empty mapping of member name -> config")
    weights = resolve_weights([str(name) for name in members], config.weights)
    return StageConfig(profile_of(params), weights, config.fit_weights, validation)


class MemberPredsError(ValueError):
    """A member's predictions, or the truth they are checked against, are missing or wrong: one line naming the
    file that is wrong and the fix."""


@dataclass(frozen=True)
class MemberPreds:
    """One member's TTA probabilities, columns in CLASSES order, rows in sample_submission's and the shared split's
    order."""

    name: str
    test_probs: np.ndarray
    valid_labels: tuple[str, ...]
    valid_probs: np.ndarray


def resolve_weights(members: Sequence[str], weights: Mapping[str, float]) -> dict[str, float]:
    """Each member's weight: the listed one, else 1; a weight for a member that is not trained is an error."""
    strangers = [name for name in weights if name not in members]
    if strangers:
        raise ParamsError(f"params.yaml: key 'ensemble.weights.{strangers[0]}' names no member of train.members "
                          f"({', '.join(members)}); remove it or add the member")
    resolved = {name: float(weights.get(name, 1.0)) for name in members}
    if sum(resolved.values()) <= 0:
        raise ParamsError("params.yaml: key 'ensemble.weights': every weight is 0; give at least one member weight > 0")
    return resolved


def _read_probabilities(path: Path, id_columns: tuple[str, ...], fix: str) -> tuple[pd.DataFrame, np.ndarray]:
    """A predictions CSV (`id_columns`, then one column per class of CLASSES) and its probabilities in CLASSES order."""
    table = read_csv(path, MemberPredsError, fix, unique="image_id")
    expected = f"expected {', '.join(id_columns)}, then one column per class of the competition"
    if tuple(table.columns[: len(id_columns)]) != id_columns:
        raise MemberPredsError(f"{path}: columns start {list(table.columns[: len(id_columns)])}; {expected}; {fix}")
    classes = list(table.columns[len(id_columns) :])
    strangers = [column for column in classes if column not in CLASSES]
    if strangers:
        raise MemberPredsError(f"{path}: column {strangers[0]!r} is not one of the competition's {len(CLASSES)} "
                               f"classes ({', '.join(CLASSES)}); {fix}")
    missing = [label for label in CLASSES if label not in classes]
    if missing:
        raise MemberPredsError(f"{path}: no column for class {missing[0]!r}; {expected}; {fix}")
    cells = table[list(CLASSES)]
    numbers = cells.apply(pd.to_numeric, errors="coerce")
    rows, columns = np.nonzero(numbers.isna().to_numpy())
    if len(rows):
        row, column = int(rows[0]), CLASSES[int(columns[0])]
        raise MemberPredsError(f"{path}: row {row + 1}, column {column!r} holds {cells.iloc[row][column]!r}, "
                               f"not a probability; {fix}")
    probs = numbers.to_numpy(dtype=float)
    if not np.isfinite(probs).all() or (probs < 0).any():
        raise MemberPredsError(f"{path}: probabilities must be finite and >= 0; {fix}")
    sums = probs.sum(axis=1)
    off = np.flatnonzero(np.abs(sums - 1) > PROB_SUM_TOLERANCE)
    if len(off):
        row = int(off[0])
        raise MemberPredsError(f"{path}: row {row + 1} sums to {sums[row]:.4f}, not 1; are these logits? {fix}")
    return table, probs


def read_member(preds_dir: Path, name: str, test_ids: Sequence[str], truth: pd.DataFrame,
                train_file: Path) -> MemberPreds:
    """preds/<name>/{test,valid}.csv as train@<name> wrote them, test rows in `test_ids` order and validation rows
    in `truth` order.

    Each member is checked against the truth, never against another member, so the error names the file that is
    wrong: its test ids must be `test_ids` (sample_submission.csv's), its validation ids and labels those of `truth`
    (the shared split of `train_file`).
    """
    test_file, valid_file = Path(preds_dir) / name / "test.csv", Path(preds_dir) / name / "valid.csv"
    rerun, split = f"rerun dvc repro train@{name}", f"{train_file} with params validation"
    for path in (test_file, valid_file):
        if not path.is_file():
            raise MemberPredsError(f"{path}: missing predictions of member '{name}'; run dvc repro train@{name}")
    test, test_probs = _read_probabilities(test_file, ("image_id",), rerun)
    valid, valid_probs = _read_probabilities(valid_file, ("image_id", "label"), rerun)
    if set(test["image_id"]) != set(test_ids) or len(test) != len(test_ids):
        raise MemberPredsError(f"{test_file}: test image ids differ from sample_submission.csv; {rerun}")
    valid_ids = set(valid["image_id"])
    missing = [image_id for image_id in truth["image_id"] if image_id not in valid_ids]
    if missing:
        raise MemberPredsError(f"{valid_file}: {len(missing)} image(s) of the shared validation split are missing "
                               f"(first: {missing[0]!r}; the split: {split}); {rerun}")
    true_label = dict(zip(truth["image_id"], truth["label"]))
    strangers = [image_id for image_id in valid["image_id"] if image_id not in true_label]
    if strangers:
        raise MemberPredsError(f"{valid_file}: image {strangers[0]!r} is not in the shared validation split "
                               f"({split}); {rerun}")
    for image_id, label in zip(valid["image_id"], valid["label"]):
        if label != true_label[image_id]:
            raise MemberPredsError(f"{valid_file}: image {image_id!r} is labelled {label!r} where {train_file} says "
                                   f"{true_label[image_id]!r}; {rerun}")
    return MemberPreds(name, test_probs[pd.Index(test["image_id"]).get_indexer(list(test_ids))], tuple(truth["label"]),
                       valid_probs[pd.Index(valid["image_id"]).get_indexer(list(truth["image_id"]))])


def weighted_average(probs: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """sum_i w_i p_i / sum_i w_i: rows still sum to 1 when each member's do (resolve_weights and fit_weights make
    the weights >= 0 with a positive sum)."""
    weights = np.asarray(weights, dtype=float)
    return np.tensordot(weights, np.stack(probs), axes=1) / weights.sum()


def accuracy(probs: np.ndarray, labels: Sequence[str], vocab: Sequence[str]) -> float | None:
    """Share of rows whose most probable class is the label; None when there are no rows (validation.full)."""
    if len(labels) == 0:
        return None
    predicted = np.asarray(vocab, dtype=object)[np.asarray(probs).argmax(axis=1)]
    return float(np.mean(predicted == np.asarray(labels, dtype=object)))


def fit_weights(valid_probs: Sequence[np.ndarray], labels: Sequence[str], vocab: Sequence[str]) -> list[float]:
    """Non-negative weights summing to 1 that minimise the log-loss of the weighted average on validation.

    They are fitted on the very rows the accuracies are measured on, so the ensemble's accuracy is then optimistic;
    metrics say so (`weights_fitted_on: valid`). On OOF rows (`oof`) each member's predictions are honest and
    plentiful (every training image), so only the few weights themselves are fitted in-sample.
    """
    if len(labels) == 0:
        raise ParamsError(FIT_NEEDS_VALIDATION)
    truth = pd.Index(list(vocab)).get_indexer(list(labels))  # paddy_data verified train.csv's labels are the vocab's
    stacked = np.stack(valid_probs)  # members x rows x classes
    true_probs = stacked[:, np.arange(len(truth)), truth]  # members x rows

    def log_loss(weights: np.ndarray) -> float:
        return float(-np.mean(np.log(np.clip(weights @ true_probs, 1e-12, None))))

    n_members = len(valid_probs)
    result = minimize(log_loss, np.full(n_members, 1 / n_members), method="SLSQP", bounds=[(0.0, 1.0)] * n_members,
                      constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}])
    weights = np.clip(result.x, 0, None)
    return [round(float(w), 6) for w in weights / weights.sum()]


@dataclass(frozen=True)
class EnsembleResult:
    """Everything the stage writes, built and validated before any of it is written."""

    member_submissions: dict[str, pd.DataFrame]
    submission: pd.DataFrame
    metrics: dict


def ensemble(members: Sequence[MemberPreds], sample: pd.DataFrame, weights: Mapping[str, float], fit: bool,
             profile: str, submissions_dir: Path = SUBMISSIONS_DIR, folds: np.ndarray | None = None) -> EnsembleResult:
    """Average aligned members, build and validate every submission, and compute the metrics; `folds`: each
    validation row's fold when they are OOF predictions (validation.folds > 1)."""
    vocab = CLASSES
    labels = members[0].valid_labels
    test_ids = list(sample["image_id"])
    weight_list = fit_weights([m.valid_probs for m in members], labels, vocab) if fit else [
        weights[m.name] for m in members]
    test_probs = weighted_average([m.test_probs for m in members], weight_list)
    valid_probs = weighted_average([m.valid_probs for m in members], weight_list)

    def checked_submission(probs: np.ndarray, name: str) -> pd.DataFrame:
        submission = build_submission(test_ids, probs, vocab)
        validate_submission(submission, sample, vocab, str(submissions_dir / name))
        return submission

    member_submissions = {m.name: checked_submission(m.test_probs, f"members/{m.name}.csv") for m in members}
    submission = checked_submission(test_probs, "submission.csv")

    member_accuracy = {m.name: accuracy(m.valid_probs, labels, vocab) for m in members}
    ensemble_accuracy = accuracy(valid_probs, labels, vocab)
    best_member = None if ensemble_accuracy is None else max(member_accuracy, key=member_accuracy.get)
    gain = None if best_member is None else round(ensemble_accuracy - member_accuracy[best_member], 6)

    def spread(probs: np.ndarray) -> dict:
        """Accuracy on each fold's OOF rows (keyed by fold id) and their spread (population std)."""
        if folds is None:
            return {}
        in_fold = {str(k): folds == k for k in np.unique(folds)}
        each = {k: accuracy(probs[rows], np.asarray(labels, dtype=object)[rows], vocab) for k, rows in in_fold.items()}
        return {"fold_accuracy": each, "fold_accuracy_std": round(float(np.std(list(each.values()))), 6)}

    metrics = {
        "profile": profile,
        "n_valid": len(labels),
        "n_test": len(test_ids),
        **({} if folds is None else {"folds": len(np.unique(folds)), "validated_on": "oof"}),
        "members": {
            m.name: {"valid_accuracy": member_accuracy[m.name], "weight": weight, **spread(m.valid_probs)}
            for m, weight in zip(members, weight_list)
        },
        "ensemble": {"valid_accuracy": ensemble_accuracy, **spread(valid_probs)},
        "best_member": best_member,
        "gain_over_best_member": gain,
        "weights_fitted_on": ("valid" if folds is None else "oof") if fit else None,
    }
    return EnsembleResult(member_submissions, submission, metrics)


def write_outputs(result: EnsembleResult, submissions_dir: Path, metrics_file: Path) -> None:
    """Write the validated submissions and the metrics, each atomically."""
    with atomic_path(Path(submissions_dir) / "members") as members_dir:
        members_dir.mkdir()
        for name, submission in result.member_submissions.items():
            submission.to_csv(members_dir / f"{name}.csv", index=False)
    write_submission_csv(Path(submissions_dir) / "submission.csv", result.submission)
    write_json(metrics_file, result.metrics)


def run(params: Mapping, preds_dir: Path = PREDS_DIR, data_dir: Path = DATA_DIR,
        submissions_dir: Path = SUBMISSIONS_DIR, metrics_file: Path = METRICS_FILE) -> dict:
    """The whole stage on `params` (params.yaml as a dict); returns the metrics it wrote."""
    config = load_config(params)
    sample = read_sample_submission(sample_submission_csv(data_dir))
    train_file = train_csv(data_dir)
    if not train_file.is_file():
        raise MemberPredsError(f"{train_file}: not found; run `dvc repro paddy_data` to fetch or generate the data")
    truth = validation_rows(data_dir, config.validation)
    members = [read_member(preds_dir, name, sample["image_id"], truth, train_file) for name in config.weights]
    folds = truth["fold"].to_numpy() if config.validation.cross_validated else None
    result = ensemble(members, sample, config.weights, config.fit_weights, config.profile, submissions_dir, folds)
    write_outputs(result, submissions_dir, metrics_file)
    return result.metrics


def _shown(value: float | None) -> str:
    return "n/a (validation.full)" if value is None else f"{value:.4f}"


@stage_main(STAGE, ParamsError, MemberPredsError, SubmissionError)
def main() -> None:
    metrics = run(read_params())
    for name, member in metrics["members"].items():
        log(STAGE, f"{name}: weight {member['weight']:g}, valid accuracy {_shown(member['valid_accuracy'])}")
    log(STAGE, f"ensemble: valid accuracy {_shown(metrics['ensemble']['valid_accuracy'])}")
    log(STAGE, f"wrote {SUBMISSIONS_DIR}/submission.csv, {SUBMISSIONS_DIR}/members/ and {METRICS_FILE}")


if __name__ == "__main__":
    main()
