"""bench loader's `--images small`: the same rows, read from the images stage small_images' own function resized."""

from PIL import Image

from benchmarks import loader
from pipeline.paddy import read_train_table
from pipeline.synthetic import write_synthetic_dataset


def test_the_pre_resized_table_reads_the_same_images_resized_once_aspect_kept(tmp_path):
    data_dir = tmp_path / "paddy"
    write_synthetic_dataset(data_dir, train_per_class=2, n_test=1, image_size=(480, 640), seed=0)
    table = read_train_table(data_dir)
    small = loader.pre_resized(table, data_dir)
    assert small.drop(columns="path").equals(table.drop(columns="path"))
    for full_path, small_path in zip(table["path"], small["path"]):
        assert small_path != full_path and small_path.name == full_path.name
        full, resized = Image.open(full_path).size, Image.open(small_path).size
        assert max(resized) == loader.SMALL_MAX_SIZE and sorted(resized) == [192, 256]
        assert (resized[0] > resized[1]) == (full[0] > full[1])  # a landscape photo stays landscape
