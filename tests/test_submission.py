"""Spec of submission CSVs: built from probabilities, validated against sample_submission.csv, written atomically."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.submission import (
    SubmissionError,
    build_submission,
    read_sample_submission,
    validate_submission,
    write_submission_csv,
)

VOCAB = ("blast", "hispa", "normal")
SAMPLE = pd.DataFrame({"image_id": ["200001.jpg", "200002.jpg", "200003.jpg"], "label": ""})


def good_submission():
    return pd.DataFrame({"image_id": SAMPLE["image_id"], "label": ["blast", "normal", "hispa"]})


def test_build_submission_takes_the_most_probable_class_of_each_row():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]])
    submission = build_submission(SAMPLE["image_id"], probs, VOCAB)
    assert submission.to_dict("list") == {
        "image_id": ["200001.jpg", "200002.jpg", "200003.jpg"],
        "label": ["blast", "normal", "hispa"],
    }


def test_build_submission_rejects_probabilities_of_the_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        build_submission(SAMPLE["image_id"], np.ones((3, 2)) / 2, VOCAB)


def test_a_matching_submission_passes():
    validate_submission(good_submission(), SAMPLE, VOCAB, "sub.csv")


def test_a_missing_row_is_an_error():
    with pytest.raises(SubmissionError, match=r"sub\.csv: 2 rows; sample_submission\.csv has 3"):
        validate_submission(good_submission().head(2), SAMPLE, VOCAB, "sub.csv")


def test_rows_in_another_order_are_an_error():
    shuffled = good_submission().iloc[[1, 0, 2]].reset_index(drop=True)
    with pytest.raises(SubmissionError, match=r"sub\.csv: row 1 has image_id '200002\.jpg'.*same order"):
        validate_submission(shuffled, SAMPLE, VOCAB, "sub.csv")


def test_an_unknown_id_is_an_error():
    submission = good_submission()
    submission.loc[2, "image_id"] = "999999.jpg"
    with pytest.raises(SubmissionError, match="row 3 has image_id '999999.jpg'"):
        validate_submission(submission, SAMPLE, VOCAB, "sub.csv")


def test_a_label_outside_the_vocab_is_an_error():
    submission = good_submission()
    submission.loc[1, "label"] = "rust"
    with pytest.raises(SubmissionError, match=r"label 'rust' \(row 2\) is not one of the 3 classes"):
        validate_submission(submission, SAMPLE, VOCAB, "sub.csv")


def test_an_empty_label_is_an_error():
    submission = good_submission()
    submission.loc[0, "label"] = None
    with pytest.raises(SubmissionError, match=r"row 1\) is not one of"):
        validate_submission(submission, SAMPLE, VOCAB, "sub.csv")


def test_extra_columns_are_an_error():
    submission = good_submission().assign(confidence=1.0)
    with pytest.raises(SubmissionError, match="columns are"):
        validate_submission(submission, SAMPLE, VOCAB, "sub.csv")


def test_a_sample_submission_with_duplicate_ids_is_an_error(tmp_path):
    sample_file = tmp_path / "sample_submission.csv"
    sample_file.write_text("image_id,label\n200001.jpg,\n200001.jpg,\n")
    with pytest.raises(SubmissionError, match="'200001.jpg' appears more than once"):
        read_sample_submission(sample_file)


def test_a_missing_sample_submission_names_the_stage_to_run(tmp_path):
    with pytest.raises(SubmissionError, match="dvc repro paddy_data"):
        read_sample_submission(tmp_path / "sample_submission.csv")


def test_a_failed_write_leaves_the_previous_file_untouched(tmp_path, monkeypatch):
    target = tmp_path / "submission.csv"
    write_submission_csv(target, good_submission())
    before = target.read_text()

    to_csv = pd.DataFrame.to_csv

    def crash(self, path, *args, **kwargs):  # half the file reaches the disk, then the disk is full
        text = to_csv(self, None, *args, **kwargs)
        Path(path).write_text(text[: len(text) // 2])
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", crash)
    with pytest.raises(OSError):
        write_submission_csv(target, good_submission().assign(label="hispa"))
    assert target.read_text() == before
    assert [path.name for path in tmp_path.iterdir()] == ["submission.csv"]
