"""What every paddy stage knows about the dataset: its layout, names, and the validation split they share."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedKFold, train_test_split

from pipeline.params import Check, FieldError, Fraction, fold_ids_for

COMPETITION = "paddy-disease-classification"
DATA_DIR = Path("data/paddy")
SMALL_DATA_DIR = Path("data/paddy_small")  # the same layout, every image pre-resized (stage small_images)
WRITTEN_BY = {DATA_DIR: "paddy_data", SMALL_DATA_DIR: "small_images"}  # the stage that writes each data folder

# The competition's 10 labels (folder names under train_images/) and 10 rice varieties, in sorted order.
CLASSES = ("bacterial_leaf_blight", "bacterial_leaf_streak", "bacterial_panicle_blight", "blast", "brown_spot",
           "dead_heart", "downy_mildew", "hispa", "normal", "tungro")
VARIETIES = ("ADT45", "AndraPonni", "AtchayaPonni", "IR20", "KarnatakaPonni", "Onthanel", "Ponni", "RR", "Surya",
             "Zonal")
SMALLEST_CLASS = "bacterial_panicle_blight"  # 337 images in the real training set (synthetic data copies this)
TRAIN_COLUMNS = ("image_id", "label", "variety", "age")
SUBMISSION_COLUMNS = ("image_id", "label")


def train_csv(data_dir: Path = DATA_DIR) -> Path:
    return Path(data_dir) / "train.csv"


def sample_submission_csv(data_dir: Path = DATA_DIR) -> Path:
    return Path(data_dir) / "sample_submission.csv"


def source_json(data_dir: Path = DATA_DIR) -> Path:
    return Path(data_dir) / "SOURCE.json"


def test_image_dir(data_dir: Path = DATA_DIR) -> Path:
    return Path(data_dir) / "test_images"


def member_data_dir(images: str) -> Path:
    """The data folder a member reads: data/paddy, or data/paddy_small for a member with `images: small`."""
    return SMALL_DATA_DIR if images == "small" else DATA_DIR


def read_train_table(data_dir: Path = DATA_DIR) -> pd.DataFrame:
    """train.csv with a `path` column pointing at each image (the stage that wrote it has verified it)."""
    table = pd.read_csv(train_csv(data_dir), dtype={"image_id": str, "label": str, "variety": str})
    table["path"] = [Path(data_dir) / "train_images" / lbl / iid for lbl, iid in zip(table["label"], table["image_id"])]
    return table


def test_image_ids(data_dir: Path = DATA_DIR) -> list[str]:
    """Test ids in sample_submission's order: the order every submission must keep."""
    return pd.read_csv(sample_submission_csv(data_dir), dtype={"image_id": str})["image_id"].tolist()


def validation_mask(labels: pd.Series | np.ndarray, valid_pct: float, seed: int) -> np.ndarray:
    """Boolean mask of the rows held out for validation, seeded and stratified by label: every member and the
    ensemble use this one split, so their validation accuracies are comparable."""
    rows = np.arange(len(labels))
    _, held_out = train_test_split(rows, test_size=valid_pct, random_state=seed, stratify=np.asarray(labels))
    return np.isin(rows, held_out)


def fold_of(labels: pd.Series | np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Each row's fold, 0 to folds - 1: sklearn's StratifiedKFold, shuffled with `seed`, shared by every member."""
    fold = np.zeros(len(labels), dtype=int)
    splits = StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(len(labels)), np.asarray(labels))
    for index, (_, held_out) in enumerate(splits):
        fold[held_out] = index
    return fold


@dataclass(frozen=True)
class ValidationConfig:
    """params `validation`: the split every member and the ensemble share: one held-out share, or K folds."""

    valid_pct: Fraction
    seed: int
    full: bool  # true: train on everything; there is no validation set
    # > 1: each member trains one model per fold, validated on all out-of-fold predictions
    folds: Annotated[int, Check(lambda n: n >= 1, "use 1 (one shared split) or a number of folds >= 2")] = 1
    fold_ids: tuple[int, ...] = ()  # the fold stages' ids, written by `make profile`: DVC cannot count to `folds`

    def __post_init__(self):
        expected = fold_ids_for(self.folds, self.full)
        if list(self.fold_ids) != expected:
            raise FieldError("fold_ids", f"is {list(self.fold_ids)}; folds {self.folds} with full "
                             f"{str(self.full).lower()} needs {expected} (`make profile` writes it)")

    @property
    def cross_validated(self) -> bool:
        return bool(self.fold_ids)


def validation_rows(data_dir: Path, validation: ValidationConfig) -> pd.DataFrame:
    """image_id and label of the held-out rows in train.csv order: the shared split's, every row with its `fold`
    when cross-validated, none when `validation.full`."""
    table = read_train_table(data_dir)[["image_id", "label"]]
    if validation.full:
        return table.iloc[:0].reset_index(drop=True)
    if validation.cross_validated:
        return table.assign(fold=fold_of(table["label"], validation.folds, validation.seed))
    return table[validation_mask(table["label"], validation.valid_pct, validation.seed)].reset_index(drop=True)


def smallest_class(labels: pd.Series) -> tuple[str, int]:
    """The label with the fewest rows (of the data loaded, not the competition's) and its count; ties: alphabetical."""
    counts = labels.value_counts()
    label = min(counts.index, key=lambda name: (counts[name], name))
    return str(label), int(counts[label])
