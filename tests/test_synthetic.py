"""The synthetic paddy set: the competition's layout, names, imbalance and correlations, byte-identical per seed."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
from PIL import Image

from pipeline import paddy
from pipeline.paddy import CLASSES, SMALLEST_CLASS, VARIETIES, read_train_table
from pipeline.synthetic import AGES, draw_image, write_synthetic_dataset


def _digests(folder):
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_layout_has_the_competitions_files_and_columns(tiny_paddy):
    train = pd.read_csv(tiny_paddy / "train.csv")
    submission = pd.read_csv(tiny_paddy / "sample_submission.csv")
    assert list(train.columns) == ["image_id", "label", "variety", "age"]
    assert list(submission.columns) == ["image_id", "label"]
    assert all(path.is_file() for path in read_train_table(tiny_paddy)["path"])
    assert sorted(p.name for p in (tiny_paddy / "test_images").iterdir()) == sorted(paddy.test_image_ids(tiny_paddy))


def test_uses_the_real_class_and_variety_names_and_ages(tiny_paddy):
    train = pd.read_csv(tiny_paddy / "train.csv")
    assert set(train["label"]) == set(CLASSES)
    assert set(train["variety"]) <= set(VARIETIES)
    assert set(train["age"]) <= set(AGES)


def test_smallest_class_is_bacterial_panicle_blight_with_half_the_images(tiny_paddy):
    counts = pd.read_csv(tiny_paddy / "train.csv")["label"].value_counts()
    assert counts.idxmin() == SMALLEST_CLASS
    assert counts[SMALLEST_CLASS] == 4
    assert (counts.drop(SMALLEST_CLASS) == 8).all()


def test_image_ids_are_unique_across_train_and_test(tiny_paddy):
    ids = pd.read_csv(tiny_paddy / "train.csv")["image_id"].tolist() + paddy.test_image_ids(tiny_paddy)
    assert len(ids) == len(set(ids))


def test_images_are_jpegs_of_the_requested_size_mostly_portrait(tmp_path):
    write_synthetic_dataset(tmp_path, train_per_class=10, n_test=40, image_size=(30, 40), seed=1)
    sizes = []
    for path in tmp_path.rglob("*.jpg"):
        with Image.open(path) as image:
            assert image.format == "JPEG"
            sizes.append(image.size)
    assert set(sizes) <= {(30, 40), (40, 30)}
    assert sizes.count((30, 40)) > 0.8 * len(sizes)


def test_variety_and_age_correlate_with_the_label(tmp_path):
    write_synthetic_dataset(tmp_path, train_per_class=40, n_test=1, image_size=(16, 16), seed=3)
    train = pd.read_csv(tmp_path / "train.csv")
    # Guessing each class's most common variety must beat guessing the overall most common one.
    per_class_hits = train.groupby("label")["variety"].agg(lambda v: v.value_counts().iloc[0]).sum()
    overall_hits = train["variety"].value_counts().iloc[0]
    assert per_class_hits > 1.5 * overall_hits
    mean_age = train.groupby("label")["age"].mean()
    assert mean_age.max() - mean_age.min() > 8


def test_same_seed_writes_byte_identical_files(tmp_path):
    options = dict(train_per_class=3, n_test=4, image_size=(32, 24), seed=7)
    write_synthetic_dataset(tmp_path / "a", **options)
    write_synthetic_dataset(tmp_path / "b", **options)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")


def test_another_seed_writes_other_images(tmp_path):
    write_synthetic_dataset(tmp_path / "a", train_per_class=3, n_test=4, image_size=(32, 24), seed=7)
    write_synthetic_dataset(tmp_path / "b", train_per_class=3, n_test=4, image_size=(32, 24), seed=8)
    assert _digests(tmp_path / "a") != _digests(tmp_path / "b")


def test_every_class_draws_a_different_picture_on_the_same_leaf():
    means = []
    for label in CLASSES:
        image = draw_image(label, VARIETIES[0], (64, 64), np.random.default_rng(0))
        means.append(np.asarray(image, dtype=np.float32).mean(axis=(0, 1)))
    distances = np.linalg.norm(np.array(means)[:, None] - np.array(means)[None], axis=-1)
    assert (distances[~np.eye(len(CLASSES), dtype=bool)] > 0.5).all()
