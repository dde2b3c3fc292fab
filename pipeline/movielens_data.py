"""Stage `movielens_data`: the MovieLens 100k ratings and titles in data/movielens/, verified.

Sources and checks: docs/stages.md. The recbole wheel carries the same files because PyPI is reachable where
GroupLens is not; `auto` tries GroupLens with a short timeout first.
"""

from __future__ import annotations

import io
import subprocess
import sys
import urllib.request
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from pipeline.common import atomic_path, banner, file_sha256, json_text, log, stage_main, write_json
from pipeline.params import ParamsError, Positive, load_section, read_params

STAGE = "movielens_data"
DATA_DIR = Path("data/movielens")
DOWNLOADS_DIR = Path("data/downloads")
METRICS_FILE = Path("metrics/movielens_data.json")
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
RECBOLE_MEMBERS = ("recbole/dataset_example/ml-100k/ml-100k.inter", "recbole/dataset_example/ml-100k/ml-100k.item")
RATING_COLUMNS = ("user", "movie", "rating", "timestamp")
MOVIE_COLUMNS = ("movie", "title")
RATING_RANGE = (1, 5)
# What a local movielens.source may be; said whenever a local path is not one of them.
LOCAL_LAYOUTS = (
    "movielens.source takes auto, grouplens, recbole, or the path of an ml-100k zip, a recbole wheel, or a folder "
    "holding u.data and u.item or ratings.csv and movies.csv"
)
# The fix for a file this stage downloaded itself (and only for those: a local source is the user's own file).
REFETCH = "delete it so that it is fetched again"
# The published size of ML-100k: a download that does not match is not the data the seeds' numbers are about.
ML_100K_COUNTS = {"n_ratings": 100_000, "n_users": 943, "n_movies": 1_682}


class MovielensDataError(ValueError):
    """Unusable MovieLens input: the message is one line naming the file and the fix."""


@dataclass(frozen=True)
class MovielensConfig:
    source: str = "auto"  # auto | grouplens | recbole | a path
    timeout_s: Positive = 5.0  # for GroupLens: `auto` falls back to recbole quickly on offline machines


def load_config(params: Mapping[str, Any]) -> MovielensConfig:
    return load_section(MovielensConfig, params, "movielens")


@dataclass(frozen=True)
class MovieLens:
    ratings: pd.DataFrame  # user, movie, rating, timestamp
    movies: pd.DataFrame  # movie, title
    source: str  # what was read, for SOURCE.json and the banner


def read_grouplens_zip(path: Path, fix: str = LOCAL_LAYOUTS) -> MovieLens:
    """ml-100k.zip as GroupLens publishes it: ml-100k/u.data and ml-100k/u.item; `fix` ends the error if unreadable."""
    with _open_zip(path, fix) as archive:
        names = [_member_ending(archive, name, path) for name in ("u.data", "u.item")]
        return _grouplens(*[(archive.read(name), f"{path}:{name}") for name in names], f"grouplens:{path.name}")


def _grouplens(data: tuple[bytes, Any], item: tuple[bytes, Any], source: str) -> MovieLens:
    """u.data (tab-separated) and u.item (latin-1, pipe-separated), each as (content, where it is)."""
    ratings = _read_table(*data, sep="\t", names=RATING_COLUMNS)
    movies = _read_table(*item, sep="|", names=MOVIE_COLUMNS, usecols=(0, 1), encoding="latin-1")
    return MovieLens(ratings, movies, source)


def read_recbole_wheel(path: Path, fix: str = LOCAL_LAYOUTS) -> MovieLens:
    """ml-100k from inside the recbole wheel: RecBole atomic files with typed headers (`user_id:token` ...); its
    split title and release_year are joined back into GroupLens' 'Star Wars (1977)'."""
    with _open_zip(path, fix) as archive:
        missing = [name for name in RECBOLE_MEMBERS if name not in archive.namelist()]
        if missing:
            raise MovielensDataError(f"{path}: no {missing[0]} inside; pass a recbole wheel that ships ml-100k")
        inter_name, item_name = RECBOLE_MEMBERS
        inter = _read_table(archive.read(inter_name), f"{path}:{inter_name}", sep="\t", header=0)
        items = _read_table(archive.read(item_name), f"{path}:{item_name}", sep="\t", header=0, dtype=str, keep_default_na=False)
    for table in (inter, items):
        table.columns = [name.split(":")[0] for name in table.columns]
    _require_columns(inter, ("user_id", "item_id", "rating", "timestamp"), f"{path}:{inter_name}")
    _require_columns(items, ("item_id", "movie_title", "release_year"), f"{path}:{item_name}")
    ratings = inter.rename(columns={"user_id": "user", "item_id": "movie"})[list(RATING_COLUMNS)]
    movies = pd.DataFrame({"movie": items["item_id"], "title": items.apply(_grouplens_title, axis=1)})
    return MovieLens(ratings, movies, f"recbole:{path.name}")


def read_local(path: Path) -> MovieLens:
    """Any of the layouts a local path may hold: a zip or wheel, GroupLens' folder or ours (ratings.csv, movies.csv)."""
    if not path.exists():
        raise MovielensDataError(f"{path}: not found; set movielens.source to auto, grouplens, recbole or an existing path")
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise MovielensDataError(f"{path}: not a zip file; {LOCAL_LAYOUTS}")
        return read_recbole_wheel(path) if path.suffix == ".whl" else read_grouplens_zip(path)
    grouplens, ours = [path / "u.data", path / "u.item"], [path / "ratings.csv", path / "movies.csv"]
    if all(file.is_file() for file in grouplens):
        return _grouplens(*[(file.read_bytes(), file) for file in grouplens], f"grouplens:{path}")
    if all(file.is_file() for file in ours):
        return MovieLens(*[_read_table(file.read_bytes(), file, header=0) for file in ours], f"local:{path}")
    raise MovielensDataError(f"{path}: holds neither u.data and u.item nor ratings.csv and movies.csv; {LOCAL_LAYOUTS}")


def _grouplens_title(item: pd.Series) -> str:
    title, year = item["movie_title"], item["release_year"]
    if title == "unkonwn":  # RecBole's spelling of GroupLens' placeholder for movie 267 (no title, no date)
        return "unknown"
    return f"{title} ({year})" if year.isdigit() else title


def _open_zip(path: Path, fix: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise MovielensDataError(f"{path}: not a readable zip ({err}); {fix}") from None


def _member_ending(archive: zipfile.ZipFile, suffix: str, path: Path) -> str:
    names = [name for name in archive.namelist() if name == suffix or name.endswith("/" + suffix)]
    if not names:
        raise MovielensDataError(f"{path}: no {suffix} inside; expected GroupLens' ml-100k.zip layout")
    return names[0]


def _read_table(raw: bytes, where, header: int | None = None, **read_csv_args) -> pd.DataFrame:
    try:
        return pd.read_csv(io.BytesIO(raw), header=header, **read_csv_args)
    except ValueError as err:  # pandas' ParserError and EmptyDataError, and UnicodeDecodeError, are ValueErrors
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MovielensDataError(f"{where}: cannot be parsed ({message}); check the file's format") from None


def _require_columns(table: pd.DataFrame, columns, where) -> None:
    missing = [name for name in columns if name not in table.columns]
    if missing:
        raise MovielensDataError(f"{where}: missing column '{missing[0]}' (has {', '.join(map(str, table.columns))}); "
                                 f"expected {', '.join(columns)}")


def validate(data: MovieLens, where: str, expected_counts: dict | None = None) -> MovieLens:
    """Typed, checked tables: integer ids, ratings in 1..5, a title for every rated movie, and `expected_counts` (the
    sizes of a known release, e.g. ML_100K_COUNTS); else MovielensDataError."""
    _require_columns(data.ratings, RATING_COLUMNS, f"{where} ratings")
    _require_columns(data.movies, MOVIE_COLUMNS, f"{where} movies")
    ratings, movies = data.ratings[list(RATING_COLUMNS)].copy(), data.movies[list(MOVIE_COLUMNS)].copy()
    if ratings.empty:
        raise MovielensDataError(f"{where} ratings: no rows; point movielens.source at a ratings file with data")
    for column in ("user", "movie", "timestamp"):
        ratings[column] = _integer_column(ratings[column], f"{where} ratings", column)
    movies["movie"] = _integer_column(movies["movie"], f"{where} movies", "movie")
    rating = pd.to_numeric(ratings["rating"], errors="coerce")
    low, high = RATING_RANGE
    bad = ~rating.between(low, high)  # NaN, from a rating that is not a number, is not between
    if bad.any():
        row = bad.to_numpy().nonzero()[0][0]
        raise MovielensDataError(f"{where} ratings: {int(bad.sum())} rating(s) outside {low}..{high} (first: row {row}, "
                                 f"{ratings['rating'].iloc[row]!r}); fix or drop those rows")
    ratings["rating"] = rating.astype("float32")
    repeated = movies["movie"][movies["movie"].duplicated()]
    if len(repeated):
        raise MovielensDataError(f"{where} movies: movie id {repeated.iloc[0]} appears twice; keep one title per id")
    untitled = sorted(set(ratings["movie"]) - set(movies["movie"]))
    if untitled:
        raise MovielensDataError(f"{where}: {len(untitled)} rated movie id(s) have no title (first: {untitled[0]}); "
                                 "add them to the movies file")
    movies["title"] = movies["title"].astype(str)
    checked = MovieLens(ratings.reset_index(drop=True), movies.sort_values("movie").reset_index(drop=True), data.source)
    found = counts(checked)
    wrong = [key for key, count in (expected_counts or {}).items() if found[key] != count]
    if wrong:
        raise MovielensDataError(f"{where}: {wrong[0]} is {found[wrong[0]]}, expected {expected_counts[wrong[0]]} for "
                                 f"ML-100k; the download is damaged, {REFETCH}")
    return checked


def _integer_column(values: pd.Series, where: str, column: str) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce")
    bad = numbers.isna() | (numbers != numbers.round())
    if bad.any():
        row = bad.to_numpy().nonzero()[0][0]
        raise MovielensDataError(f"{where}: column '{column}' needs integer ids, row {row} has {values.iloc[row]!r}; fix "
                                 "or drop that row")
    return numbers.astype("int64")


def counts(data: MovieLens) -> dict:
    return {"n_ratings": len(data.ratings), "n_users": int(data.ratings["user"].nunique()),
            "n_movies": int(data.ratings["movie"].nunique())}


def fetch_grouplens(downloads: Path, timeout_s: float) -> Path:
    """ml-100k.zip from GroupLens, cached in `downloads`; URLError/OSError when offline."""
    target = downloads / "ml-100k.zip"
    if target.is_file():
        return target
    log(STAGE, f"downloading {GROUPLENS_URL} (timeout {timeout_s:g} s)")
    with urllib.request.urlopen(GROUPLENS_URL, timeout=timeout_s) as response, atomic_path(target) as tmp:
        tmp.write_bytes(response.read())
    return target


def fetch_recbole_wheel(downloads: Path) -> Path:
    """The recbole wheel from PyPI (without its dependencies), cached in `downloads`/recbole/."""
    folder = downloads / "recbole"
    if not any(folder.glob("recbole-*.whl")):
        log(STAGE, "fetching the recbole wheel from PyPI (pip download --no-deps) for its copy of ml-100k")
        with atomic_path(folder) as staging:  # renamed into place only once pip has delivered a wheel
            command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "recbole", "-d",
                       str(staging)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0 or not any(staging.glob("recbole-*.whl")):
                reason = (result.stderr.strip().splitlines() or ["no wheel"])[-1]
                raise MovielensDataError(f"pip download recbole failed ({reason}); set movielens.source to a local "
                                         "ml-100k zip or folder")
    return sorted(folder.glob("recbole-*.whl"))[-1]


def load(config: MovielensConfig, downloads: Path = DOWNLOADS_DIR) -> MovieLens:
    """Read and validate the configured source (auto: GroupLens, then the recbole wheel)."""
    if config.source in ("auto", "grouplens"):
        try:
            archive = fetch_grouplens(downloads, config.timeout_s)
        except OSError as err:  # URLError and socket timeouts are OSErrors
            if config.source == "grouplens":
                raise MovielensDataError(f"{GROUPLENS_URL}: unreachable ({err}); use source auto or recbole, or a "
                                         "local path") from None
            log(STAGE, f"GroupLens unreachable ({err}); falling back to the recbole wheel")
        else:
            return validate(read_grouplens_zip(archive, REFETCH), str(archive), ML_100K_COUNTS)
    if config.source in ("auto", "recbole"):
        wheel = fetch_recbole_wheel(downloads)
        return validate(read_recbole_wheel(wheel, REFETCH), str(wheel), ML_100K_COUNTS)
    return validate(read_local(Path(config.source)), config.source)


def write_dataset(data: MovieLens, target: Path = DATA_DIR) -> dict:
    """ratings.csv, movies.csv and SOURCE.json, swapped in as one directory; returns SOURCE.json's content."""
    with atomic_path(target) as staging:
        staging.mkdir()
        data.ratings.to_csv(staging / "ratings.csv", index=False)
        data.movies.to_csv(staging / "movies.csv", index=False)
        source = {"source": data.source, **counts(data),
                  "sha256": {name: file_sha256(staging / name) for name in ("ratings.csv", "movies.csv")}}
        (staging / "SOURCE.json").write_text(json_text(source))
    return source


@stage_main(STAGE, ParamsError, MovielensDataError)
def main() -> None:
    config = load_config(read_params())
    data = load(config)
    source = write_dataset(data)
    banner(STAGE, f"MovieLens source: {data.source} ({source['n_ratings']} ratings, {source['n_users']} users, "
           f"{source['n_movies']} movies)")
    write_json(METRICS_FILE, {**source, "rating_mean": float(data.ratings["rating"].mean()), "params": asdict(config)})
    log(STAGE, f"wrote {DATA_DIR}/ and {METRICS_FILE}")


if __name__ == "__main__":
    main()
