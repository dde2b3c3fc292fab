"""Stage `paddy_data`: the Paddy Doctor data in data/paddy/, verified, in the competition's own layout.

Built and verified beside data/paddy and swapped in with one rename: a killed run or a failed check leaves the
previous data in place. Sources and checks: docs/stages.md#paddy_data-the-competitions-data-verified.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shutil
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path, PureWindowsPath
from typing import Annotated, Any, Mapping

import pandas as pd
from PIL import Image

from pipeline import kaggle_client
from pipeline.common import atomic_path, banner, file_sha256, log, read_csv, stage_main, write_json
from pipeline.paddy import (CLASSES, COMPETITION, DATA_DIR, SUBMISSION_COLUMNS, TRAIN_COLUMNS, VARIETIES,
                            sample_submission_csv, smallest_class, source_json, test_image_dir, train_csv)
from pipeline.params import Check, ParamsError, PositiveInt, load_section, profile_of, read_params, seed_of
from pipeline.synthetic import write_synthetic_dataset

STAGE = "paddy_data"
DOWNLOADS_DIR = Path("data/downloads")
KAGGLE_INPUT = Path("/kaggle/input")  # where a Kaggle notebook mounts its attached competitions and datasets
METRICS_FILE = Path("metrics/data.json")
SOURCE_FINGERPRINT = Path("checks/paddy_source.json")
# The way round Kaggle this stage offers, added to every Kaggle error.
OTHER_SOURCES = "set data.source to synthetic or to a local copy of the competition zip"
NO_CREDENTIALS = f"{kaggle_client.NO_CREDENTIALS}, or {OTHER_SOURCES}"
LAYOUT = "train.csv, sample_submission.csv, train_images/<label>/, test_images/"
MAX_LISTED = 20  # bad files logged one per line before the error
_OR_SKIP = ", or set data.skip_bad_images: true to leave it out"


@dataclass(frozen=True)
class SyntheticConfig:
    train_per_class: Annotated[int, Check(lambda n: n >= 2, "use at least 2")]  # the smallest class gets half of this
    n_test: PositiveInt
    image_size: Annotated[tuple[int, int], Check(lambda wh: min(wh) >= 16, "use at least 16 pixels a side")]  # (w, h)


@dataclass(frozen=True)
class DataConfig:
    source: Annotated[str, Check(str.strip, "use kaggle, synthetic or the path of the competition zip or folder")]
    skip_bad_images: bool
    synthetic: SyntheticConfig


@dataclass(frozen=True)
class StageConfig:
    profile: str  # recorded in the metrics
    seed: int  # of the synthetic data
    data: DataConfig


def load_config(params: Mapping[str, Any]) -> StageConfig:
    return StageConfig(profile=profile_of(params), seed=seed_of(params), data=load_section(DataConfig, params, "data"))


class DataError(ValueError):
    """Bad or unavailable input data: the message is one line naming the file and the fix."""


@dataclass(frozen=True)
class BadFile:
    """A file or train.csv row that fails a check; `skippable` ones may be left out with skip_bad_images."""

    file: str  # relative to the data folder
    problem: str
    fix: str
    skippable: bool = True
    drop_row: str | None = None  # the train.csv image_id to drop when skipping
    delete_file: bool = False  # remove the file from data/paddy when skipping

    def line(self) -> str:
        return f"{self.file}: {self.problem}; {self.fix}"


@stage_main(STAGE, ParamsError, DataError)
def main(argv: list[str] | None = None) -> None:
    config = load_config(read_params())
    if (sys.argv[1:] if argv is None else argv) == ["--fingerprint"]:  # the `paddy_source` stage
        write_json(SOURCE_FINGERPRINT, source_fingerprint(config.data.source))
        return
    record = prepare_data(config.data, config.seed, DATA_DIR, DOWNLOADS_DIR)
    write_json(METRICS_FILE, data_metrics(record, config.profile))
    counts = record["counts"]
    log(STAGE, f"{DATA_DIR}: {counts['train']} train and {counts['test']} test images from {record['source']}")


def source_fingerprint(source: str) -> dict:
    """A local source's paths, sizes and mtimes, hashed: the `paddy_source` stage (always_changed) writes it so that
    paddy_data, which depends on it, reruns when the source changes (DVC cannot depend on a path set by a param)."""
    path = Path(source).expanduser()
    if source in ("kaggle", "synthetic") or not path.exists():
        return {"source": source}
    files = sorted(file for file in path.rglob("*") if file.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(path).as_posix()} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return {"source": source, "files": len(files), "sha256": digest.hexdigest()}


def prepare_data(config: DataConfig, seed: int, data_dir: Path, downloads_dir: Path) -> dict:
    """Fetch or generate the data, verify it, write SOURCE.json, swap it into `data_dir`; return the SOURCE record."""
    mounted = kaggle_mount(COMPETITION) if config.source == "kaggle" else None
    if config.source == "synthetic":
        synthetic, where = asdict(config.synthetic), "synthetic data"
        banner(STAGE, f"SYNTHETIC paddy data (seed {seed}), NOT the competition's: set data.source: kaggle for it")
        origin = {"source": "synthetic",
                  "synthetic": {"seed": seed, **synthetic, "image_size": list(synthetic["image_size"])}}
        fill = functools.partial(write_synthetic_dataset, **synthetic, seed=seed)
    elif mounted is not None:
        log(STAGE, f"data source: kaggle, the competition's files attached to this notebook at {mounted} (in place)")
        origin = {"source": "kaggle", "competition": COMPETITION, "in_place": str(mounted)}
        fill, where = functools.partial(link_in_place, mounted), str(mounted)
    else:
        kaggle = config.source == "kaggle"
        archive = download_competition(COMPETITION, downloads_dir) if kaggle else _local_source(config.source, data_dir)
        origin = {"source": "kaggle", "competition": COMPETITION} if kaggle else {"source": config.source}
        log(STAGE, f"data source: {origin['source']}" + ("" if origin["source"] == str(archive) else f" ({archive})"))
        where = str(archive)
        if archive.is_dir():
            fill = functools.partial(shutil.copytree, _layout_root(archive, archive))
        else:
            fill, origin["archive_sha256"] = functools.partial(extract_competition, archive), file_sha256(archive)
    with atomic_path(data_dir) as staging:
        fill(staging)
        return _verify_and_record(staging, origin, config.skip_bad_images, where)


def kaggle_mount(competition: str) -> Path | None:
    """The competition's folder in a Kaggle notebook that has it attached, else None ($PADDY_KAGGLE_INPUT: tests')."""
    if "KAGGLE_KERNEL_RUN_TYPE" not in os.environ:
        return None
    mounted = Path(os.environ.get("PADDY_KAGGLE_INPUT", KAGGLE_INPUT)) / competition
    if train_csv(mounted).is_file():
        return mounted
    log(STAGE, f"{mounted} not found: attach the competition to the notebook (Add Input) to use its files in place")
    return None


def link_in_place(mounted: Path, staging: Path) -> None:
    """The layout at `staging`, its image folders links into `mounted`: DVC 3 does not follow them, so data/paddy's
    cache holds the tables and SOURCE.json (with every image's hash) alone."""
    staging.mkdir()
    for entry in mounted.iterdir():
        if entry.is_dir():
            (staging / entry.name).symlink_to(entry, target_is_directory=True)
        else:
            shutil.copy2(entry, staging / entry.name)


def _local_source(source: str, data_dir: Path) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data.source {source!r}: no such file or folder; use kaggle, synthetic, or the path of the "
                        "competition zip or of its extracted folder")
    if path.resolve().is_relative_to(data_dir.resolve()):
        raise DataError(f"data.source {source!r} is inside {data_dir}, this stage's output; copy it elsewhere first")
    if path.is_file() and not zipfile.is_zipfile(path):
        raise DataError(f"{path}: not a zip file; point data.source at the competition zip or its extracted folder")
    return path


def _verify_and_record(staging: Path, origin: dict, skip_bad_images: bool, where: str) -> dict:
    skipped, images_sha256 = verify_dataset(staging, skip_bad_images, where)
    train = pd.read_csv(train_csv(staging), dtype={"image_id": str, "label": str})
    n_test = len(pd.read_csv(sample_submission_csv(staging)))
    per_class = {label: int((train["label"] == label).sum()) for label in CLASSES}
    smallest, smallest_count = smallest_class(train["label"])
    tables = {path.name: file_sha256(path) for path in (train_csv(staging), sample_submission_csv(staging))}
    record = {**origin, "counts": {"train": len(train), "test": n_test, "per_class": per_class},
              "smallest_class": {"label": smallest, "count": smallest_count},
              "checksums": {**tables, "images": images_sha256},
              "skipped": [{"file": bad.file, "problem": bad.problem} for bad in skipped]}
    write_json(source_json(staging), record)
    return record


def data_metrics(record: dict, profile: str) -> dict:
    """metrics/data.json: the profile, where the data came from, its counts and what was skipped."""
    return {"profile": profile, **{key: record[key] for key in ("source", "counts", "smallest_class")},
            "n_skipped": len(record["skipped"]), "skipped": record["skipped"]}


def download_competition(competition: str, downloads_dir: Path) -> Path:
    """The competition zip, from the download cache or else from the Kaggle API (then cached)."""
    archive = downloads_dir / f"{competition}.zip"
    if archive.is_file():
        log(STAGE, f"using the cached download {archive} (delete it to download again)")
        return archive
    where = kaggle_client.credentials_source()
    if where is None:
        raise DataError(NO_CREDENTIALS)
    log(STAGE, f"downloading the {competition} files with the Kaggle API (credentials from {where})")
    # Into atomic_path's scratch folder (a killed run's is removed by the next): only a complete zip is cached.
    with atomic_path(archive) as staged:
        try:
            kaggle_client.authenticated_api().competition_download_files(competition, path=str(staged.parent))
        except kaggle_client.KaggleError as err:
            raise DataError(f"{err}, or {OTHER_SOURCES}") from None
        except kaggle_client.CLIENT_ERRORS as err:
            failure = kaggle_client.failure_message(err, competition, "download")
            raise DataError(f"{failure}; or {OTHER_SOURCES}") from None
        zips = sorted(staged.parent.glob("*.zip"))
        if not zips or not zipfile.is_zipfile(zips[0]):
            raise DataError(f"the Kaggle API did not deliver a complete zip of {competition}; run the stage again")
        os.replace(zips[0], staged)
    return archive


def extract_competition(archive: Path, destination: Path) -> None:
    """Extract the competition zip so that its train.csv lands at `destination`/train.csv; refuse entries with an
    absolute path or a `..` (zip-slip), which zipfile would silently strip."""
    unpacked = destination.parent / "unpacked"
    try:
        with zipfile.ZipFile(archive) as bundle:
            for name in bundle.namelist():
                path = PureWindowsPath(name)  # reads both / and \\ as separators, and sees drives (C:) and roots
                if path.anchor or ".." in path.parts:
                    raise DataError(f"{archive}: entry {name!r} points outside the folder it is extracted to "
                                    "(zip-slip); nothing was extracted: this is not the competition's zip, use the "
                                    "original from Kaggle")
            bundle.extractall(unpacked)
    except zipfile.BadZipFile as err:
        raise DataError(f"{archive}: corrupt zip ({err}); delete it and run the stage again") from None
    os.replace(_layout_root(unpacked, archive), destination)


def _layout_root(folder: Path, origin: Path) -> Path:
    """`folder` if it holds train.csv, else its one subfolder that does (zips made by hand often add one)."""
    if train_csv(folder).is_file():
        return folder
    nested = [child for child in folder.iterdir() if child.is_dir() and train_csv(child).is_file()]
    if len(nested) == 1:
        return nested[0]
    raise DataError(f"{origin}: no train.csv at its top level; expected the competition layout ({LAYOUT})")


def verify_dataset(data_dir: Path, skip_bad_images: bool = False, origin: str | None = None) -> tuple[list[BadFile], str]:
    """Check `data_dir` against the competition layout; return (the files skipped, a sha256 of all images).

    Errors read `origin: file` (default `data_dir`). A bad file is a one-line DataError unless `skip_bad_images` and
    it is skippable (training files only: the submission needs every test image); skipped ones leave the data.
    """
    where = origin or str(data_dir)
    train = _read_table(train_csv(data_dir), TRAIN_COLUMNS, where)
    submission = _read_table(sample_submission_csv(data_dir), SUBMISSION_COLUMNS, where)
    for folder in ("train_images", "test_images"):
        if not (data_dir / folder).is_dir():
            raise DataError(f"{where}: {folder}/ is missing; the data is incomplete, expected {LAYOUT}")

    bad = _bad_rows(train, data_dir) + _stray_train_images(train, data_dir) + _test_mismatches(submission, data_dir)
    unusable = {bad_file.drop_row for bad_file in bad}
    images = [Path("train_images") / label / iid for label, iid in zip(train["label"], train["image_id"])
              if iid not in unusable]
    images += [Path("test_images") / iid for iid in submission["image_id"]
               if (test_image_dir(data_dir) / iid).is_file()]
    unreadable, images_sha256 = _read_images(data_dir, images)
    bad += unreadable

    # The first bad file, or with skip_bad_images the first that cannot be skipped.
    blocking = next((bad_file for bad_file in bad if not (skip_bad_images and bad_file.skippable)), None)
    if blocking:
        for bad_file in bad[:MAX_LISTED]:
            log(STAGE, bad_file.line())
        shown = "all listed above" if len(bad) <= MAX_LISTED else f"the first {MAX_LISTED} listed above"
        more = f" ({len(bad)} bad files, {shown})" if len(bad) > 1 else ""
        raise DataError(f"{where}: {blocking.line()}{more}")
    if bad:
        train = _skip(bad, train, data_dir)
    empty = [label for label in CLASSES if not (train["label"] == label).any()]
    if empty:
        raise DataError(f"{where}: train.csv has no images of class {empty[0]!r}; the data is incomplete, download it "
                        "again (data.source: kaggle) or restore that class in the local copy")
    return bad, images_sha256


def _read_table(path: Path, columns: tuple[str, ...], where: str) -> pd.DataFrame:
    name = f"{where}: {path.name}"
    if not path.is_file():
        raise DataError(f"{name} is missing; the data is incomplete, expected {LAYOUT}")
    table = read_csv(path, DataError, "restore it from the competition zip (one row per image)", "image_id", name)
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise DataError(f"{name}: missing column {missing[0]!r} (has {', '.join(table.columns)}); it must have "
                        f"{', '.join(columns)}")
    if table.empty:
        raise DataError(f"{name}: no rows; restore it from the competition zip")
    return table


def _bad_rows(train: pd.DataFrame, data_dir: Path) -> list[BadFile]:
    bad = []
    for line, row in enumerate(train.itertuples(index=False), start=2):
        problem = (f"label {row.label!r} is not one of the 10 classes" if row.label not in CLASSES
                   else f"variety {row.variety!r} is not one of the 10 varieties" if row.variety not in VARIETIES
                   else f"age {row.age!r} is not a whole number of days" if not row.age.isdigit() else None)
        if problem:
            bad.append(BadFile(f"train.csv line {line} ({row.image_id})", problem, "fix or remove the row" + _OR_SKIP,
                               drop_row=row.image_id))
        elif not (data_dir / "train_images" / row.label / row.image_id).is_file():
            bad.append(BadFile(f"train_images/{row.label}/{row.image_id}", "listed in train.csv but missing",
                               "restore the image from the competition zip, or remove its row from train.csv" + _OR_SKIP,
                               drop_row=row.image_id))
    return bad


def _stray_train_images(train: pd.DataFrame, data_dir: Path) -> list[BadFile]:
    listed = {f"train_images/{label}/{iid}" for label, iid in zip(train["label"], train["image_id"]) if label in CLASSES}
    bad = []
    for file in sorted(path.relative_to(data_dir) for path in (data_dir / "train_images").rglob("*") if path.is_file()):
        if file.as_posix() not in listed:
            problem = ("is not listed in train.csv" if len(file.parts) == 3 and file.parts[1] in CLASSES
                       else "is not in a folder named after one of the 10 classes")
            bad.append(BadFile(str(file), problem, "add its row to train.csv or remove the file" + _OR_SKIP,
                               delete_file=True))
    return bad


def _test_mismatches(submission: pd.DataFrame, data_dir: Path) -> list[BadFile]:
    expected = set(submission["image_id"])
    on_disk = {path.name for path in test_image_dir(data_dir).iterdir() if path.is_file()}
    fix = "test_images/ and sample_submission.csv must list the same images; restore both from the competition zip"
    missing = [BadFile(f"test_images/{iid}", "listed in sample_submission.csv but missing", fix, skippable=False)
               for iid in submission["image_id"] if iid not in on_disk]
    extra = [BadFile(f"test_images/{name}", "not listed in sample_submission.csv", fix, skippable=False)
             for name in sorted(on_disk - expected)]
    return missing + extra


def _read_images(data_dir: Path, images: list[Path]) -> tuple[list[BadFile], str]:
    """Decode every image (verify + load, in threads: PIL releases the GIL) and hash them all in the same read."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(lambda relative: _read_image(data_dir / relative), images))
    bad, manifest = [], hashlib.sha256()
    for relative, (digest, problem) in zip(images, results):
        manifest.update(f"{relative.as_posix()} {digest}\n".encode())
        if problem is None:
            continue
        is_train = relative.parts[0] == "train_images"
        fix = "replace it from the competition zip" + (_OR_SKIP if is_train else " (every test image must be predicted)")
        bad.append(BadFile(relative.as_posix(), problem, fix, skippable=is_train,
                           drop_row=relative.name if is_train else None, delete_file=True))
    return bad, manifest.hexdigest()


def _read_image(path: Path) -> tuple[str, str | None]:
    content = path.read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    try:
        with Image.open(io.BytesIO(content)) as image:
            # PIL only warns between its limit and twice it: a 12000x12000 image would be decoded for every epoch.
            if image.width * image.height > Image.MAX_IMAGE_PIXELS:
                return digest, (f"{image.width}x{image.height} pixels, more than PIL's limit of {Image.MAX_IMAGE_PIXELS} "
                                "(the competition's are 480x640)")
            image.verify()
        with Image.open(io.BytesIO(content)) as image:  # verify() misses truncated pixel data; a full decode finds it
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return digest, f"not a readable image ({type(err).__name__}: {str(err)[:80]})"
    return digest, None


def _skip(bad: list[BadFile], train: pd.DataFrame, data_dir: Path) -> pd.DataFrame:
    """Leave the bad files out of `data_dir`; return the train table that is left."""
    for bad_file in bad:
        log(STAGE, f"skipping {bad_file.file}: {bad_file.problem}")
        if bad_file.delete_file:
            (data_dir / bad_file.file).unlink(missing_ok=True)
    kept = train[~train["image_id"].isin({bad_file.drop_row for bad_file in bad})]
    kept.to_csv(train_csv(data_dir), index=False)
    for folder in (data_dir / "train_images").iterdir():
        if folder.is_dir() and folder.name not in CLASSES and not any(folder.rglob("*")):
            folder.rmdir()
    return kept


if __name__ == "__main__":
    main()
