"""The shared validation split (pipeline.paddy.validation_mask) and K folds (fold_of): seeded, stratified by label."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.paddy import CLASSES, ValidationConfig, fold_of, validation_mask
from pipeline.params import ParamsError, from_mapping

# Images per class in the competition's train.csv (10,407 in all): bacterial_panicle_blight is the smallest.
REAL_COUNTS = dict(
    zip(CLASSES, (479, 380, 337, 1738, 965, 1442, 620, 1594, 1764, 1088))
)
# A small imbalanced set like the synthetic demo's, down to classes too small to always get a validation image.
SMALL_COUNTS = dict(zip(CLASSES, (60, 30, 12, 9, 7, 5, 5, 3, 2, 2)))


def shuffled_labels(counts: dict[str, int]) -> np.ndarray:
    labels = np.repeat(list(counts), list(counts.values()))
    return np.random.default_rng(0).permutation(labels)


@pytest.mark.parametrize("counts", [REAL_COUNTS, SMALL_COUNTS], ids=["real", "small"])
@pytest.mark.parametrize("valid_pct", [0.2, 0.3])
def test_each_class_keeps_its_share_in_valid_within_one_image(counts, valid_pct):
    labels = shuffled_labels(counts)
    mask = validation_mask(labels, valid_pct, seed=42)
    for label, n in counts.items():
        in_valid = int(mask[labels == label].sum())
        assert abs(in_valid - valid_pct * n) <= 1, (label, in_valid, n)


def test_every_class_with_enough_images_appears_in_valid():
    # One large class and nine with just enough for one validation image each: a split that ignored the labels
    # would leave some of them out of valid.
    counts = {CLASSES[0]: 200} | dict.fromkeys(CLASSES[1:], 5)
    labels = shuffled_labels(counts)
    for seed in range(10):
        mask = validation_mask(labels, 0.2, seed)
        assert [label for label in CLASSES if not mask[labels == label].any()] == [], seed


def test_the_split_is_seeded():
    labels = shuffled_labels(REAL_COUNTS)
    assert (validation_mask(labels, 0.2, seed=1) == validation_mask(labels, 0.2, seed=1)).all()
    assert (validation_mask(labels, 0.2, seed=1) != validation_mask(labels, 0.2, seed=2)).any()


@pytest.mark.parametrize("folds", [2, 5])
def test_every_row_is_in_exactly_one_fold_and_each_fold_keeps_every_class_share_within_one_image(folds):
    labels = shuffled_labels(REAL_COUNTS)
    fold = fold_of(labels, folds, seed=42)
    assert sorted(set(fold)) == list(range(folds))  # one fold per row, every fold used
    for label, n in REAL_COUNTS.items():
        per_fold = np.bincount(fold[labels == label], minlength=folds)
        assert per_fold.max() - per_fold.min() <= 1, (label, per_fold)


def test_the_folds_are_seeded():
    labels = shuffled_labels(REAL_COUNTS)
    assert (fold_of(labels, 5, seed=1) == fold_of(labels, 5, seed=1)).all()
    assert (fold_of(labels, 5, seed=1) != fold_of(labels, 5, seed=2)).any()


@pytest.mark.parametrize("folds, full, fold_ids", [(1, False, [0]), (3, False, [0, 1]), (3, True, [0, 1, 2])])
def test_fold_ids_that_do_not_match_folds_are_a_one_line_error_naming_the_fix(folds, full, fold_ids):
    raw = dict(valid_pct=0.2, seed=0, full=full, folds=folds, fold_ids=fold_ids)
    with pytest.raises(ParamsError, match=r"key 'validation\.fold_ids' .*needs .*make profile"):
        from_mapping(ValidationConfig, raw, "validation")


def test_k_folds_are_cross_validated_unless_training_on_everything():
    config = from_mapping(ValidationConfig, dict(valid_pct=0.2, seed=0, full=False, folds=3, fold_ids=[0, 1, 2]), "v")
    assert config.cross_validated
    assert not from_mapping(ValidationConfig, dict(valid_pct=0.2, seed=0, full=True, folds=3), "v").cross_validated
