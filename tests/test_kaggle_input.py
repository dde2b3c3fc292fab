"""`data.source: kaggle` in a Kaggle notebook with the competition attached: its read-only files used in place.

A fake /kaggle/input (PADDY_KAGGLE_INPUT) holds the competition's layout, read-only as Kaggle mounts it, and
KAGGLE_KERNEL_RUN_TYPE is set as in a notebook. No credentials exist: a download attempt would fail.
"""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest

from pipeline import paddy_data
from pipeline.paddy import COMPETITION
from pipeline.paddy_data import DataConfig, DataError, SyntheticConfig, prepare_data

TINY = SyntheticConfig(train_per_class=4, n_test=4, image_size=(32, 48))
KAGGLE_CONFIG = DataConfig(source="kaggle", skip_bad_images=False, synthetic=TINY)


def read_only(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


@pytest.fixture
def kaggle_notebook(tiny_paddy, tmp_path, monkeypatch) -> Path:
    """A Kaggle notebook with the competition attached (a read-only copy of tiny_paddy) and no credentials."""
    for name in list(paddy_data.os.environ):
        if name.startswith("KAGGLE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    monkeypatch.setenv("PADDY_KAGGLE_INPUT", str(tmp_path / "input"))
    mounted = tmp_path / "input" / COMPETITION
    shutil.copytree(tiny_paddy, mounted, ignore=shutil.ignore_patterns("SOURCE.json"))
    read_only(mounted)
    yield mounted
    for path in [mounted, *mounted.rglob("*")]:  # let pytest remove it
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_kaggle_source_in_a_notebook_uses_the_attached_competition_in_place(kaggle_notebook, tmp_path):
    data_dir, downloads = tmp_path / "paddy", tmp_path / "downloads"
    record = prepare_data(KAGGLE_CONFIG, 0, data_dir, downloads)
    assert record["source"] == "kaggle" and record["in_place"] == str(kaggle_notebook)
    assert json.loads((data_dir / "SOURCE.json").read_text())["in_place"] == str(kaggle_notebook)
    for images in ("train_images", "test_images"):  # linked, not copied
        assert (data_dir / images).is_symlink() and (data_dir / images).resolve() == kaggle_notebook / images
    assert (data_dir / "train.csv").read_bytes() == (kaggle_notebook / "train.csv").read_bytes()
    assert not downloads.exists()  # nothing downloaded
    assert record["counts"]["train"] == len((kaggle_notebook / "train.csv").read_text().splitlines()) - 1


def test_the_attached_competition_is_still_verified(kaggle_notebook, tmp_path):
    broken = next((kaggle_notebook / "test_images").iterdir())
    broken.chmod(0o644)
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=rf"{kaggle_notebook}: test_images/{broken.name}: not a readable image"):
        prepare_data(KAGGLE_CONFIG, 0, tmp_path / "paddy", tmp_path / "downloads")


def test_outside_a_notebook_kaggle_source_downloads_as_before(kaggle_notebook, tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE")
    with pytest.raises(DataError, match="credentials"):
        prepare_data(KAGGLE_CONFIG, 0, tmp_path / "paddy", tmp_path / "downloads")


def test_a_notebook_without_the_competition_attached_downloads_and_says_how_to_attach(
    kaggle_notebook, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("PADDY_KAGGLE_INPUT", str(tmp_path / "elsewhere"))
    with pytest.raises(DataError, match="credentials"):
        prepare_data(KAGGLE_CONFIG, 0, tmp_path / "paddy", tmp_path / "downloads")
    assert "attach the competition to the notebook" in capsys.readouterr().err
