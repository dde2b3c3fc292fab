"""Stage `small_images`: every image of data/paddy resized once into data/paddy_small, for members with `images: small`.

As the seeds ("Road to the Top, part 2": Kaggle's 4 cores cannot decode 480x640 JPEGs fast enough): fastai's
`resize_images` to a longest side of `small_images.max_size`, in the competition's layout (tables too: a member reads
it as it reads data/paddy), swapped in with one rename.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Mapping

from pipeline.common import atomic_path, file_sha256, log, read_json, stage_main, write_json
from pipeline.paddy import (DATA_DIR, SMALL_DATA_DIR, read_train_table, sample_submission_csv, source_json,
                            test_image_ids, train_csv)
from pipeline.params import Check, ParamsError, load_section, read_params

STAGE = "small_images"


@dataclass(frozen=True)
class SmallImagesConfig:
    max_size: Annotated[int, Check(lambda n: n >= 16, "use at least 16 pixels, e.g. 256")]  # the longest side in pixels


def load_config(params: Mapping[str, Any]) -> SmallImagesConfig:
    return load_section(SmallImagesConfig, params, "small_images")


class SmallImagesError(ValueError):
    """Missing or incomplete input: the message is one line naming the file and the fix."""


def resize_image_folders(source: Path, destination: Path, max_size: int, workers: int | None = None) -> None:
    """fastai's resize_images on train_images/ and test_images/ (`workers` processes; None: up to 4, 0: none)."""
    # fastai imports torch: imported here so that check_params, which loads this stage's config, stays light.
    from fastai.vision.utils import resize_images

    for folder in ("train_images", "test_images"):
        resize_images(Path(source) / folder, dest=Path(destination) / folder, max_size=max_size, recurse=True,
                      max_workers=min(4, os.cpu_count() or 1) if workers is None else workers)


def write_small_images(source: Path, destination: Path, max_size: int, workers: int | None = None) -> dict:
    """Resize every image listed in `source`'s tables into `destination`; return its SOURCE record (the source's,
    with the resized images' hash: what train resumes on)."""
    listed = [path.relative_to(source) for path in read_train_table(source)["path"]]
    listed += [Path("test_images") / iid for iid in test_image_ids(source)]
    with atomic_path(destination) as staging:
        resize_image_folders(source, staging, max_size, workers)
        manifest = hashlib.sha256()
        for relative in listed:  # resize_images skips a file it cannot read without a word
            if not (staging / relative).is_file():
                raise SmallImagesError(f"{source / relative}: not resized (unreadable?); run "
                                       "`dvc repro --force --single-item paddy_data`")
            manifest.update(f"{relative.as_posix()} {file_sha256(staging / relative)}\n".encode())
        for table in (train_csv(source), sample_submission_csv(source)):
            shutil.copy2(table, staging / table.name)
        record = read_json(source_json(source))
        record["checksums"]["images"] = manifest.hexdigest()
        record["resized"] = {"from": str(source), "max_size": max_size}
        write_json(source_json(staging), record)
    return record


@stage_main(STAGE, ParamsError, SmallImagesError)
def main() -> None:
    config = load_config(read_params())
    if not source_json(DATA_DIR).is_file():
        raise SmallImagesError(f"{source_json(DATA_DIR)}: not found; run `dvc repro paddy_data` first")
    record = write_small_images(DATA_DIR, SMALL_DATA_DIR, config.max_size)
    log(STAGE, f"{SMALL_DATA_DIR}: {sum(record['counts'][s] for s in ('train', 'test'))} images, longest side "
               f"{config.max_size} px")


if __name__ == "__main__":
    main()
