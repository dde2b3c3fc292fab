"""Submission CSVs: built from probabilities, checked against sample_submission.csv (columns, ids, order, labels).

Shared by `ensemble` (which writes them) and `make submit` (which uploads one), so both apply the same rules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from pipeline.common import atomic_path, read_csv
from pipeline.paddy import SUBMISSION_COLUMNS


class SubmissionError(ValueError):
    """A submission that does not match sample_submission.csv: the message is one line naming the file."""


# The fix for a submission file that is unreadable or fails validation: the ensemble stage writes it.
REWRITE = "run `dvc repro ensemble` to write it again"


def read_sample_submission(path: Path | str) -> pd.DataFrame:
    """sample_submission.csv, ids as strings; a missing file or a duplicated id is a SubmissionError."""
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: not found; run `dvc repro paddy_data` to fetch or generate the data")
    restore = "restore it with `dvc checkout data/paddy` (or `dvc repro paddy_data`)"
    sample = read_csv(path, SubmissionError, restore, unique="image_id")
    if "image_id" not in sample.columns:
        raise SubmissionError(f"{path}: no `image_id` column, not the competition's sample_submission.csv; {restore}")
    return sample


def build_submission(image_ids: Sequence[str], probs: np.ndarray, vocab: Sequence[str]) -> pd.DataFrame:
    """image_id and the most probable label of each row of `probs` (columns in `vocab` order)."""
    probs = np.asarray(probs)
    if probs.shape != (len(image_ids), len(vocab)):
        raise ValueError(f"probabilities have shape {probs.shape}; expected ({len(image_ids)}, {len(vocab)})")
    labels = np.asarray(vocab, dtype=object)[probs.argmax(axis=1)]
    return pd.DataFrame({"image_id": list(image_ids), "label": labels}, columns=list(SUBMISSION_COLUMNS))


def validate_submission(submission: pd.DataFrame, sample: pd.DataFrame, vocab: Sequence[str], name: str) -> None:
    """Raise SubmissionError (naming file `name`) unless `submission` has sample's columns and ids, labels in vocab."""
    columns = list(submission.columns)
    if columns != list(SUBMISSION_COLUMNS):
        raise SubmissionError(f"{name}: columns are {columns[:5]}; expected {list(SUBMISSION_COLUMNS)}; {REWRITE}")
    if len(submission) != len(sample):
        raise SubmissionError(f"{name}: {len(submission)} rows; sample_submission.csv has {len(sample)}; {REWRITE}")
    ids = submission["image_id"].astype(str).to_numpy()
    expected = sample["image_id"].astype(str).to_numpy()
    mismatch = np.flatnonzero(ids != expected)
    if len(mismatch):
        row = int(mismatch[0])
        raise SubmissionError(f"{name}: row {row + 1} has image_id {ids[row]!r} where sample_submission.csv has "
                              f"{expected[row]!r} (same ids, same order required); {REWRITE}")
    labels = submission["label"]
    unknown = labels[~labels.isin(list(vocab))]
    if len(unknown):
        raise SubmissionError(f"{name}: label {unknown.iloc[0]!r} (row {int(unknown.index[0]) + 1}) is not one of the "
                              f"{len(vocab)} classes {', '.join(vocab)}; {REWRITE}")


def read_submission(path: Path | str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: not found; run `dvc repro ensemble` to write it")
    return read_csv(path, SubmissionError, REWRITE)


def write_submission_csv(path: Path | str, submission: pd.DataFrame) -> None:
    """Write an already validated submission atomically: a failed write leaves the previous file in place."""
    with atomic_path(path) as tmp:
        submission.to_csv(tmp, index=False)

