"""collab: the seeds' DotProductBias, its interpretation, cold start and bad input, on a tiny ratings fixture.

The fixture: 12 users x 10 movies; movie 1 rated 5 by everyone, movie 10 rated 1 by everyone; users 1-6 like
movies 2-5 and dislike 6-9, users 7-12 the reverse.
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import collab
from pipeline.params import ParamsError, from_mapping

FIXTURE = Path(__file__).parent / "fixtures" / "movielens"
FAST = dict(n_factors=4, epochs=15, lr=0.05, wd=0.01, bs=16, valid_pct=0.1, report_min_ratings=1)


@pytest.fixture(scope="module")
def fixture_tables():
    return collab.read_movielens(FIXTURE)


@pytest.fixture(scope="module")
def trained_on_fixture(fixture_tables):
    ratings, _ = fixture_tables
    config = collab.CollabConfig(**FAST)
    splits = collab.random_split(len(ratings), config.valid_pct, config.seed)
    learn, errors = collab.train_and_evaluate(ratings, splits, config)
    return learn, errors, collab.trained_collab(learn)


def test_model_predicts_one_rating_per_pair_inside_y_range():
    model = collab.DotProductBias(n_users=5, n_movies=7, n_factors=3, y_range=(0, 5.5))
    with torch.no_grad():
        for table in (model.user_factors, model.movie_factors, model.user_bias, model.movie_bias):
            table.weight.fill_(30.0)  # saturate: sigmoid_range must still stay inside (0, 5.5)
        out = model(torch.tensor([[0, 0], [4, 6], [2, 3]]))
    assert out.shape == (3, 1)
    assert bool(((out > 0) & (out <= 5.5)).all())


def test_model_has_one_factor_row_and_one_bias_per_user_and_movie():
    model = collab.DotProductBias(n_users=5, n_movies=7, n_factors=3)
    assert model.user_factors.weight.shape == (5, 3) and model.movie_factors.weight.shape == (7, 3)
    assert model.user_bias.weight.shape == (5, 1) and model.movie_bias.weight.shape == (7, 1)


def test_training_on_the_fixture_beats_predicting_the_mean(trained_on_fixture, fixture_tables):
    ratings, _ = fixture_tables
    _, errors, _ = trained_on_fixture
    assert errors["rmse"] == pytest.approx(errors["mse"] ** 0.5)
    assert errors["rmse"] < ratings["rating"].std()


def test_training_losses_survive_scoring_for_the_curves_report(trained_on_fixture):
    learn, errors, _ = trained_on_fixture
    assert len(learn.recorder.losses) == FAST["epochs"] * len(learn.dls.train)
    assert learn.recorder.values[-1][1] == pytest.approx(errors["mse"], rel=1e-5)  # valid_loss of the last epoch


def test_movie_bias_ranks_the_universally_loved_movie_first_and_the_hated_one_last(trained_on_fixture, fixture_tables):
    ratings, movies = fixture_tables
    _, _, trained = trained_on_fixture
    ranking = collab.movie_bias_ranking(collab.movie_table(trained, ratings, movies), top=3)
    assert ranking.iloc[0][["group", "title"]].tolist() == ["most liked", "Loved By All (1990)"]
    least = ranking[ranking["group"] == "least liked"]
    assert least.iloc[0]["title"] == "Hated By All (1995)"


def test_similar_movies_are_the_nearest_by_cosine_of_factors(fixture_tables):
    ratings, movies = fixture_tables
    factors = np.array([[0, 0], [1, 0.1], [1, 0], [0, 1], [0.1, 1]] + [[1, 1]] * 6, dtype=float)
    trained = collab.TrainedCollab(
        user_ids=np.array([1]), movie_ids=np.arange(1, 11), user_factors=np.zeros((2, 2)), user_bias=np.zeros(2),
        movie_factors=factors, movie_bias=np.zeros(11), y_range=(0.0, 5.5),
    )
    table = collab.movie_table(trained, ratings, movies)
    similar = collab.similar_movies(trained, table, ["Loved By All (1990)", "Space C (1983)"], top=1)
    assert similar[["query", "title"]].values.tolist() == [
        ["Loved By All (1990)", "Space A (1977)"], ["Space C (1983)", "Space B (1980)"]
    ]


def test_report_queries_fall_back_to_the_most_rated_movies_without_the_seeds_titles():
    table = pd.DataFrame({"title": ["Rare (1990)", "Popular (1991)", "Middling (1992)"], "n_ratings": [2, 90, 40]})
    assert collab.query_titles(table, count=2) == ["Popular (1991)", "Middling (1992)"]


def test_report_queries_are_the_seeds_titles_when_present():
    table = pd.DataFrame({"title": ["Rare (1990)", "Star Wars (1977)"], "n_ratings": [90, 2]})
    assert collab.query_titles(table) == ["Star Wars (1977)"]


def test_cold_start_falls_back_to_biases_instead_of_an_index_error(trained_on_fixture):
    trained = trained_on_fixture[2]
    predicted = collab.predict(trained, users=[1, 999, 999, 1], movies=[2, 1, 10, 12345])
    assert predicted["basis"].tolist() == [
        "factors+biases", "movie bias (unknown user)", "movie bias (unknown user)", "user bias (unknown movie)"
    ]
    assert predicted["rating"].between(*trained.y_range).all()
    loved, hated = predicted["rating"].iloc[1], predicted["rating"].iloc[2]
    assert loved > hated


def test_predict_for_known_pairs_matches_the_trained_network(trained_on_fixture, fixture_tables):
    learn, _, trained = trained_on_fixture
    ratings, _ = fixture_tables
    pairs = ratings.head(5)
    rows = torch.tensor([[learn.dls.classes["user"].o2i[u], learn.dls.classes["movie"].o2i[m]]
                         for u, m in zip(pairs["user"], pairs["movie"])])
    with torch.no_grad():
        expected = learn.model.cpu()(rows).view(-1).numpy()
    predicted = collab.predict(trained, pairs["user"], pairs["movie"])["rating"].to_numpy()
    np.testing.assert_allclose(predicted, expected, rtol=1e-5)


def test_saved_model_loads_back_identical(trained_on_fixture, tmp_path):
    trained = trained_on_fixture[2]
    collab.save_model(trained, tmp_path / "collab.pth")
    loaded = collab.load_model(tmp_path / "collab.pth")
    np.testing.assert_array_equal(loaded.movie_factors, trained.movie_factors)
    np.testing.assert_array_equal(loaded.user_ids, trained.user_ids)
    assert loaded.y_range == trained.y_range


def test_missing_ratings_file_says_which_stage_makes_it(tmp_path):
    with pytest.raises(collab.CollabError, match="ratings.csv: not found; run `python -m pipeline.movielens_data`"):
        collab.read_movielens(tmp_path)


def test_ratings_file_without_rating_column_is_rejected(tmp_path):
    shutil.copy(FIXTURE / "movies.csv", tmp_path)
    pd.read_csv(FIXTURE / "ratings.csv").drop(columns="rating").to_csv(tmp_path / "ratings.csv", index=False)
    with pytest.raises(collab.CollabError, match="missing column 'rating'"):
        collab.read_movielens(tmp_path)


@pytest.mark.parametrize("bad, message", [
    ({"y_range": [5.5, 0.0]}, "low < high"),
    ({"valid_pct": 1.5}, "between 0 and 1"),
    ({"bs": 0}, "bs' is 0; use a positive integer"),
])
def test_bad_params_are_one_line_errors(bad, message):
    with pytest.raises(ParamsError, match=message):
        from_mapping(collab.CollabConfig, {**FAST, **bad}, "collab")


def test_model_is_one_plain_class_that_pickles():
    model = collab.DotProductBias(n_users=5, n_movies=7, n_factors=3)
    restored = pickle.loads(pickle.dumps(model))
    assert isinstance(restored, collab.DotProductBias)
    torch.testing.assert_close(restored.movie_factors.weight, model.movie_factors.weight)


def test_cross_validation_scores_each_fold_on_rows_it_did_not_train_on():
    # Every row has its own user and movie, all rated 5. Trained on, a row is predicted near 5; held out, its user and
    # movie are unknown to that fold's model (fastai's '#na#' embedding row, never trained: sigmoid_range(~0) = 2.75),
    # so only an RMSE near 5 - 2.75 = 2.25 in every fold shows each fold was scored on rows it never saw.
    n_rows = 30
    ratings = pd.DataFrame({"user": np.arange(n_rows), "movie": np.arange(n_rows) + 1000, "rating": 5.0})
    config = collab.CollabConfig(**{**FAST, "lr": 0.3, "epochs": 20, "y_range": (0.0, 5.5)})
    everything = np.arange(n_rows)
    _, in_sample = collab.train_and_evaluate(ratings, (everything, everything), config)
    assert in_sample["rmse"] < 1.0  # the contrast the CV check relies on: training rows are learned
    cv = collab.cross_validated_rmse(ratings, config, folds=3)
    assert cv["rmse_per_fold"] == pytest.approx([2.25] * 3, abs=0.02)


@pytest.mark.slow
def test_stage_writes_model_metrics_curves_and_reports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(FIXTURE, tmp_path / "data" / "movielens")
    params = "\n".join(f"  {k}: {v}" for k, v in {**FAST, "epochs": 3}.items())
    (tmp_path / "params.yaml").write_text(f"collab:\n{params}\n")  # its own section is all the stage reads
    collab.main()
    metrics = pd.read_json(tmp_path / "metrics" / "collab.json", typ="series")
    assert metrics["n_ratings"] == 104 and metrics["rmse"] > 0
    assert (tmp_path / "models" / "collab.pth").is_file()
    reports = {p.name for p in (tmp_path / "reports" / "collab").iterdir()}
    assert reports == {"movie_bias.csv", "similar_movies.csv", "pca_movies.png", "training_curves.png"}
    assert any((tmp_path / "dvclive" / "collab" / "plots").rglob("*rmse*"))
    assert not (tmp_path / "dvc.yaml").exists()
