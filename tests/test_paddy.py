"""The shared validation split (pipeline.paddy.validation_mask): seeded and stratified by label."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.paddy import CLASSES, validation_mask

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
