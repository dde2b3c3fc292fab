"""movielens_data: readers for each source, validation of malformed input, the written layout. No network."""

from __future__ import annotations

import json
import zipfile

import pandas as pd
import pytest

from pipeline import movielens_data as ml

U_DATA = "1\t10\t5\t881250949\n1\t20\t3\t881250950\n2\t10\t4\t881250951\n"
U_ITEM = "10|Amélie (2001)|01-Jan-2001||http://x|0|1\n20|Star Wars (1977)|01-Jan-1977||http://y|1|0\n"
INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t5\t881250949\n2\t267\t2\t881250950\n"
ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "10\tSilence of the Lambs, The\t1991\tDrama Thriller\n267\tunkonwn\tunkonwn\tunknown\n"
)


def fake_grouplens_zip(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ml-100k/u.data", U_DATA)
        archive.writestr("ml-100k/u.item", U_ITEM.encode("latin-1"))
    return path


def fake_recbole_wheel(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("recbole/__init__.py", "")
        archive.writestr("recbole/dataset_example/ml-100k/ml-100k.inter", INTER)
        archive.writestr("recbole/dataset_example/ml-100k/ml-100k.item", ITEM)
    return path


def tables(ratings_rows, movies_rows=((10, "A (1990)"), (20, "B (1991)"))):
    return ml.MovieLens(
        pd.DataFrame(ratings_rows, columns=["user", "movie", "rating", "timestamp"]),
        pd.DataFrame(movies_rows, columns=["movie", "title"]),
        "test",
    )


def test_grouplens_zip_reads_tab_separated_ratings_and_latin1_titles(tmp_path):
    data = ml.validate(ml.read_grouplens_zip(fake_grouplens_zip(tmp_path / "ml-100k.zip")), "zip")
    assert list(data.ratings.columns) == ["user", "movie", "rating", "timestamp"]
    assert data.ratings["rating"].tolist() == [5, 3, 4]
    assert data.movies["title"].tolist() == ["Amélie (2001)", "Star Wars (1977)"]


def test_recbole_wheel_reads_typed_atomic_files_and_rejoins_titles_with_years(tmp_path):
    data = ml.validate(ml.read_recbole_wheel(fake_recbole_wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl")), "whl")
    assert data.ratings[["user", "movie"]].values.tolist() == [[1, 10], [2, 267]]
    assert dict(zip(data.movies["movie"], data.movies["title"])) == {
        10: "Silence of the Lambs, The (1991)", 267: "unknown"
    }


def test_wheel_without_movielens_is_a_clear_error(tmp_path):
    wheel = tmp_path / "recbole-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("recbole/__init__.py", "")
    with pytest.raises(ml.MovielensDataError, match="no recbole/dataset_example/ml-100k/ml-100k.inter inside"):
        ml.read_recbole_wheel(wheel)


def test_auto_falls_back_to_the_recbole_wheel_when_grouplens_is_unreachable(tmp_path, monkeypatch):
    wheel = fake_recbole_wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl")

    def offline(downloads, timeout_s):
        raise OSError("Name or service not known")

    monkeypatch.setattr(ml, "fetch_grouplens", offline)
    monkeypatch.setattr(ml, "fetch_recbole_wheel", lambda downloads: wheel)
    monkeypatch.setattr(ml, "ML_100K_COUNTS", {"n_ratings": 2, "n_users": 2, "n_movies": 2})
    data = ml.load(ml.MovielensConfig(source="auto"), tmp_path)
    assert data.source.startswith("recbole:")


def test_grouplens_source_offline_says_what_to_use_instead(tmp_path, monkeypatch):
    monkeypatch.setattr(ml, "fetch_grouplens", lambda downloads, timeout_s: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(ml.MovielensDataError, match="unreachable.*use source auto or recbole"):
        ml.load(ml.MovielensConfig(source="grouplens"), tmp_path)


def test_wrong_counts_for_ml100k_are_reported_as_a_damaged_download():
    with pytest.raises(ml.MovielensDataError, match="n_ratings is 1, expected 100000"):
        ml.validate(tables([(1, 10, 4, 0)]), "x.zip", ml.ML_100K_COUNTS)


def test_missing_column_names_the_column():
    data = ml.MovieLens(pd.DataFrame({"user": [1], "movie": [10], "timestamp": [0]}), tables([]).movies, "t")
    with pytest.raises(ml.MovielensDataError, match="missing column 'rating'"):
        ml.validate(data, "ratings.csv")


@pytest.mark.parametrize("rating", [0, 6, "five"])
def test_rating_outside_one_to_five_is_rejected(rating):
    with pytest.raises(ml.MovielensDataError, match=r"outside 1\.\.5 \(first: row 1"):
        ml.validate(tables([(1, 10, 4, 0), (1, 20, rating, 0)]), "ratings.csv")


@pytest.mark.parametrize("user", [1.5, "alice", None])
def test_non_integer_ids_are_rejected(user):
    with pytest.raises(ml.MovielensDataError, match="column 'user' needs integer ids, row 0"):
        ml.validate(tables([(user, 10, 4, 0)]), "ratings.csv")


def test_rated_movie_without_title_is_rejected():
    with pytest.raises(ml.MovielensDataError, match="1 rated movie id.*no title.*first: 99"):
        ml.validate(tables([(1, 99, 4, 0)]), "ratings.csv")


def test_unparseable_file_is_a_one_line_error(tmp_path):
    folder = tmp_path / "ml"
    folder.mkdir()
    (folder / "ratings.csv").write_text("")
    (folder / "movies.csv").write_text("movie,title\n10,A\n")
    with pytest.raises(ml.MovielensDataError, match="ratings.csv: cannot be parsed"):
        ml.read_local(folder)


def test_missing_local_path_names_the_param(tmp_path):
    with pytest.raises(ml.MovielensDataError, match="not found; set movielens.source"):
        ml.read_local(tmp_path / "nowhere")


def test_written_dataset_reads_back_as_a_local_source_with_checksums(tmp_path):
    data = ml.validate(ml.read_grouplens_zip(fake_grouplens_zip(tmp_path / "ml-100k.zip")), "zip")
    source = ml.write_dataset(data, tmp_path / "movielens")
    assert sorted(p.name for p in (tmp_path / "movielens").iterdir()) == ["SOURCE.json", "movies.csv", "ratings.csv"]
    assert json.loads((tmp_path / "movielens" / "SOURCE.json").read_text()) == source
    assert source["n_ratings"] == 3 and set(source["sha256"]) == {"ratings.csv", "movies.csv"}
    again = ml.validate(ml.read_local(tmp_path / "movielens"), "again")
    pd.testing.assert_frame_equal(again.ratings, data.ratings)


def test_main_turns_bad_input_into_a_one_line_exit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("movielens:\n  source: missing.zip\n  timeout_s: 5\n")
    with pytest.raises(SystemExit, match="^movielens_data: missing.zip: not found"):
        ml.main()


def test_a_plain_ratings_csv_as_source_says_which_layouts_are_accepted_and_never_to_delete_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ratings.csv").write_text("user,movie,rating,timestamp\n1,10,4,0\n")
    (tmp_path / "params.yaml").write_text("profile: demo\nmovielens:\n  source: ratings.csv\n  timeout_s: 5\n")
    with pytest.raises(SystemExit) as stopped:
        ml.main()
    message = str(stopped.value)
    assert message.startswith("movielens_data: ratings.csv: not a zip file; movielens.source takes")
    assert "a folder holding u.data and u.item or ratings.csv and movies.csv" in message
    assert "delete" not in message and "\n" not in message
    assert (tmp_path / "ratings.csv").is_file()


def test_a_corrupt_cached_download_is_to_be_deleted_and_fetched_again(tmp_path):
    (tmp_path / "ml-100k.zip").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ml.MovielensDataError, match=r"ml-100k\.zip: not a readable zip .*; delete it so that it is fetched"):
        ml.load(ml.MovielensConfig(source="grouplens"), tmp_path)
