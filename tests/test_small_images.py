"""Stage small_images: every image resized once (longest side max_size, aspect kept) into the same layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipeline import small_images
from pipeline.paddy import DATA_DIR, SMALL_DATA_DIR, member_data_dir, read_train_table
from pipeline.params import ParamsError
from pipeline.synthetic import write_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def large_paddy(tmp_path_factory) -> Path:
    """A tiny set of 60x80 (w x h) images, as the real 480x640 portraits (a few landscape)."""
    data_dir = tmp_path_factory.mktemp("large") / "paddy"
    write_synthetic_dataset(data_dir, train_per_class=2, n_test=3, image_size=(60, 80), seed=0)
    from pipeline.paddy_data import _verify_and_record  # the SOURCE.json paddy_data writes

    _verify_and_record(data_dir, {"source": "synthetic"}, False, "test")
    return data_dir


def test_every_image_is_resized_to_max_size_keeping_its_aspect(large_paddy, tmp_path):
    small = tmp_path / "small"
    small_images.write_small_images(large_paddy, small, max_size=40, workers=0)
    table = read_train_table(large_paddy)
    pairs = [(path, small / path.relative_to(large_paddy)) for path in table["path"]]
    pairs += [(path, small / path.relative_to(large_paddy)) for path in (large_paddy / "test_images").iterdir()]
    assert len(pairs) == len(table) + 3
    for original, resized in pairs:
        (w, h), (small_w, small_h) = Image.open(original).size, Image.open(resized).size
        assert max(small_w, small_h) == 40
        assert abs(small_w / small_h - w / h) < 0.05
    assert (small / "train.csv").read_bytes() == (large_paddy / "train.csv").read_bytes()
    assert (small / "sample_submission.csv").read_bytes() == (large_paddy / "sample_submission.csv").read_bytes()


def test_source_json_carries_the_resized_images_hash(large_paddy, tmp_path):
    original = json.loads((large_paddy / "SOURCE.json").read_text())
    small_images.write_small_images(large_paddy, tmp_path / "a", max_size=40, workers=0)
    small_images.write_small_images(large_paddy, tmp_path / "b", max_size=30, workers=0)
    a, b = (json.loads((tmp_path / name / "SOURCE.json").read_text()) for name in ("a", "b"))
    assert a["resized"]["max_size"] == 40 and a["counts"] == original["counts"]
    hashes = {original["checksums"]["images"], a["checksums"]["images"], b["checksums"]["images"]}
    assert len(hashes) == 3  # what a resumed checkpoint is matched against changes with the images


def test_max_size_below_16_is_a_one_line_params_error():
    with pytest.raises(ParamsError, match=r"small_images.max_size' is 8; use at least 16"):
        small_images.load_config({"small_images": {"max_size": 8}})


def test_a_member_opts_into_the_small_images_and_the_default_is_full_size():
    assert member_data_dir("small") == SMALL_DATA_DIR and member_data_dir("full") == DATA_DIR
    defaults = yaml.safe_load((ROOT / "pipeline/profiles/base.yaml").read_text())["train"]["member_defaults"]
    assert defaults["images"] == "full"


@pytest.mark.parametrize("stage", ["probe", "train"])
def test_probe_and_train_rerun_when_the_small_images_change(stage):
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["do"]["deps"]
    assert "data/paddy_small" in deps and "data/paddy" in deps
