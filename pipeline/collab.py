"""Stage `collab`: collaborative filtering on MovieLens 100k, the seeds' DotProductBias trained with fastai.

Written out as in fastbook chapter 8, not fastai's EmbeddingDotBias, so the reader sees every parameter (fastai's
collab_learner is the reference in benchmarks/collab.py). Params and outputs: docs/stages.md.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from dvclive.fastai import DVCLiveCallback
from fastai.collab import TabularCollab
from fastai.data.block import TransformBlock
from fastai.data.transforms import RandomSplitter
from fastai.layers import Embedding, Module, sigmoid_range
from fastai.learner import Learner
from fastai.losses import MSELossFlat
from fastai.metrics import rmse
from fastai.tabular.core import Categorify
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.model_selection import KFold

from pipeline.common import atomic_path, log, stage_main, write_json
from pipeline.collab_config import CollabConfig
from pipeline.torch_setup import quiet_progress, seed_everything
from pipeline.params import ParamsError, load_section, read_params

STAGE = "collab"
DATA_DIR = Path("data/movielens")
MODEL_FILE = Path("models/collab.pth")
METRICS_FILE = Path("metrics/collab.json")
REPORTS_DIR = Path("reports/collab")
DVCLIVE_DIR = Path("dvclive/collab")
# "Movies like X" for these when the data has them (the seeds' examples), else for the most-rated movies.
WELL_KNOWN_TITLES = ("Star Wars (1977)", "Silence of the Lambs, The (1991)", "Toy Story (1995)")


class CollabError(ValueError):
    """Unusable input for the collab stage: the message is one line naming the file and the fix."""


class DotProductBias(Module):
    """The seeds' model: sigmoid_range(user·movie + user_bias + movie_bias) into y_range."""

    def __init__(self, n_users, n_movies, n_factors, y_range=(0, 5.5)):
        self.user_factors = Embedding(n_users, n_factors)
        self.user_bias = Embedding(n_users, 1)
        self.movie_factors = Embedding(n_movies, n_factors)
        self.movie_bias = Embedding(n_movies, 1)
        self.y_range = y_range

    def forward(self, x):
        users = self.user_factors(x[:, 0])
        movies = self.movie_factors(x[:, 1])
        res = (users * movies).sum(dim=1, keepdim=True)
        res += self.user_bias(x[:, 0]) + self.movie_bias(x[:, 1])
        return sigmoid_range(res, *self.y_range)


def read_movielens(data_dir: Path = DATA_DIR) -> tuple[pd.DataFrame, pd.DataFrame]:
    """ratings (user, movie, rating) and movies (movie, title) as movielens_data wrote them."""
    tables = {}
    for name, columns in (("ratings", ("user", "movie", "rating")), ("movies", ("movie", "title"))):
        path = data_dir / f"{name}.csv"
        if not path.is_file():
            raise CollabError(f"{path}: not found; run `python -m pipeline.movielens_data` (or dvc repro movielens_data)")
        table = pd.read_csv(path)
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise CollabError(f"{path}: missing column '{missing[0]}'; rebuild it with `python -m pipeline.movielens_data`")
        tables[name] = table[list(columns)]
    return tables["ratings"], tables["movies"]


def random_split(n_rows: int, valid_pct: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """fastai's RandomSplitter: the same seeded split CollabDataLoaders.from_df(valid_pct, seed) makes."""
    train, valid = RandomSplitter(valid_pct=valid_pct, seed=seed)(range(n_rows))
    return np.asarray(train), np.asarray(valid)


def collab_dataloaders(ratings: pd.DataFrame, splits, bs: int, seed: int):
    """fastai's collab DataLoaders (Categorify on user and movie, fitted on the training rows only) for `splits`."""
    seed_everything(seed)
    return TabularCollab(ratings[["user", "movie", "rating"]], [Categorify], ["user", "movie"], y_names=["rating"],
                         y_block=TransformBlock(), splits=[list(split) for split in splits]).dataloaders(bs=bs)


def fit(learn, config: CollabConfig) -> float:
    """fit_one_cycle(epochs, lr, wd) as the seeds; returns the seconds it took."""
    start = time.perf_counter()
    learn.fit_one_cycle(config.epochs, config.lr, wd=config.wd)
    return time.perf_counter() - start


def validation_errors(learn) -> dict:
    """MSE and RMSE on the validation set: the last epoch's valid_loss, as fastai's Recorder holds it (MSELossFlat)."""
    mse = float(learn.recorder.values[-1][1])
    return {"mse": mse, "rmse": mse**0.5}


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def torch_threads() -> int:
    return torch.get_num_threads()


def train_and_evaluate(ratings: pd.DataFrame, splits, config: CollabConfig, cbs=()) -> tuple[object, dict]:
    """DotProductBias (MSE loss) trained on `splits[0]`, scored on `splits[1]`: (learner, {mse, rmse, train_seconds})."""
    dls = collab_dataloaders(ratings, splits, config.bs, config.seed)
    model = DotProductBias(len(dls.classes["user"]), len(dls.classes["movie"]), config.n_factors, tuple(config.y_range))
    learn = Learner(dls, model, loss_func=MSELossFlat(), metrics=rmse, cbs=list(cbs))
    quiet_progress(learn)
    seconds = fit(learn, config)
    return learn, {**validation_errors(learn), "train_seconds": seconds}


def cross_validated_rmse(ratings: pd.DataFrame, config: CollabConfig, folds: int) -> dict:
    """RMSE of `folds`-fold cross-validation (seeded KFold): per fold, mean and standard deviation."""
    splits = KFold(n_splits=folds, shuffle=True, random_state=config.seed).split(np.arange(len(ratings)))
    per_fold = [train_and_evaluate(ratings, split, config)[1]["rmse"] for split in splits]
    return {"folds": folds, "rmse_per_fold": per_fold, "rmse_mean": float(np.mean(per_fold)),
            "rmse_std": float(np.std(per_fold))}


@dataclass(frozen=True)
class TrainedCollab:
    """What models/collab.pth holds: weights as numpy arrays and their raw ids (row i+1 is ids[i]; row 0 '#na#')."""

    user_ids: np.ndarray
    movie_ids: np.ndarray
    user_factors: np.ndarray
    user_bias: np.ndarray
    movie_factors: np.ndarray
    movie_bias: np.ndarray
    y_range: tuple[float, float]


def trained_collab(learn) -> TrainedCollab:
    model, classes = learn.model, learn.dls.classes
    weights = {name: getattr(model, name).weight.detach().cpu().numpy().copy()
               for name in ("user_factors", "user_bias", "movie_factors", "movie_bias")}
    ids = [np.asarray([int(raw) for raw in classes[name][1:]]) for name in ("user", "movie")]
    return TrainedCollab(*ids, weights["user_factors"], weights["user_bias"][:, 0], weights["movie_factors"],
                         weights["movie_bias"][:, 0], tuple(float(v) for v in model.y_range))


def save_model(trained: TrainedCollab, path: Path = MODEL_FILE) -> None:
    payload = {name: (torch.from_numpy(value) if isinstance(value, np.ndarray) else list(value))
               for name, value in asdict(trained).items()}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_model(path: Path = MODEL_FILE) -> TrainedCollab:
    if not path.is_file():
        raise CollabError(f"{path}: not found; train it with `python -m pipeline.collab`")
    payload = torch.load(path, weights_only=True)
    return TrainedCollab(**{name: (value.numpy() if isinstance(value, torch.Tensor) else tuple(value))
                            for name, value in payload.items()})


def predict(trained: TrainedCollab, users, movies) -> pd.DataFrame:
    """Predicted ratings for (user, movie) pairs of raw ids; an unknown id (cold start) has no factors and the mean
    bias of the known ones. Column `basis` says which case each row is."""
    users, movies = np.asarray(users), np.asarray(movies)
    # Embedding row i + 1 is ids[i] (row 0 is fastai's '#na#'); get_indexer gives -1 for an unknown id.
    user_rows, movie_rows = (pd.Index(ids).get_indexer(wanted) + 1 for ids, wanted in
                             ((trained.user_ids, users), (trained.movie_ids, movies)))
    known_user, known_movie = user_rows > 0, movie_rows > 0
    both = known_user & known_movie
    dot = np.where(both, (trained.user_factors[user_rows] * trained.movie_factors[movie_rows]).sum(axis=1), 0.0)
    user_bias = np.where(known_user, trained.user_bias[user_rows], trained.user_bias[1:].mean())
    movie_bias = np.where(known_movie, trained.movie_bias[movie_rows], trained.movie_bias[1:].mean())
    low, high = trained.y_range
    rating = low + (high - low) / (1 + np.exp(-(dot + user_bias + movie_bias)))
    cases = ["factors+biases", "movie bias (unknown user)", "user bias (unknown movie)"]
    basis = np.select([both, known_movie, known_user], cases, "mean biases (unknown user and movie)")
    return pd.DataFrame({"user": users, "movie": movies, "rating": rating, "basis": basis})


def movie_table(trained: TrainedCollab, ratings: pd.DataFrame, movies: pd.DataFrame) -> pd.DataFrame:
    """One row per trained movie: id, title, bias, number of ratings (index = embedding row)."""
    table = pd.DataFrame({"movie": trained.movie_ids, "bias": trained.movie_bias[1:]}, index=np.arange(1, len(trained.movie_ids) + 1))
    table["title"] = table["movie"].map(movies.set_index("movie")["title"])
    table["n_ratings"] = table["movie"].map(ratings["movie"].value_counts()).fillna(0).astype(int)
    return table


def movie_bias_ranking(table: pd.DataFrame, top: int = 10, min_ratings: int = 1) -> pd.DataFrame:
    """Most and least liked movies once user taste and movie factors are accounted for: the extremes of the bias."""
    rated = table[table["n_ratings"] >= min_ratings].sort_values("bias", ascending=False)
    most, least = rated.head(top).assign(group="most liked"), rated.tail(top)[::-1].assign(group="least liked")
    return pd.concat([most, least])[["group", "movie", "title", "bias", "n_ratings"]].reset_index(drop=True)


def similar_movies(trained: TrainedCollab, table: pd.DataFrame, titles, top: int = 5, min_ratings: int = 1) -> pd.DataFrame:
    """For each title, the movies whose factor vectors are closest by cosine similarity."""
    candidates = table[table["n_ratings"] >= min_ratings]
    factors = trained.movie_factors[candidates.index]
    unit = factors / np.linalg.norm(factors, axis=1, keepdims=True).clip(1e-12)
    rows = []
    for title in titles:
        query = candidates.index[candidates["title"] == title]
        if query.empty:
            continue
        position = candidates.index.get_loc(query[0])
        similarity = unit @ unit[position]
        similarity[position] = -np.inf
        for rank, neighbour in enumerate(np.argsort(-similarity)[:top], start=1):
            match = candidates.iloc[neighbour]
            rows.append({"query": title, "rank": rank, "title": match["title"], "movie": match["movie"],
                         "cosine_similarity": float(similarity[neighbour]), "n_ratings": match["n_ratings"]})
    return pd.DataFrame(rows, columns=["query", "rank", "title", "movie", "cosine_similarity", "n_ratings"])


def query_titles(table: pd.DataFrame, count: int = 3) -> list[str]:
    """The seeds' example titles when present, else the most-rated movies."""
    present = [title for title in WELL_KNOWN_TITLES if title in set(table["title"])]
    return present or table.sort_values("n_ratings", ascending=False)["title"].head(count).tolist()


def plot_pca_map(trained: TrainedCollab, table: pd.DataFrame, path: Path, n_fit: int = 1000, n_shown: int = 50) -> None:
    """The `n_fit` most-rated movies' factors on their first two principal components (as fastbook), the `n_shown`
    most-rated labelled by title."""
    popular = table.sort_values("n_ratings", ascending=False).head(n_fit)
    coords = PCA(n_components=2, random_state=0).fit_transform(trained.movie_factors[popular.index])
    shown = slice(0, min(n_shown, len(popular)))
    # A bare Figure, not pyplot's: it draws without a display and without choosing a GUI backend.
    figure = Figure(figsize=(12, 12))
    axes = figure.subplots()
    axes.scatter(coords[shown, 0], coords[shown, 1], s=8)
    for (x, y), title in zip(coords[shown], popular["title"].iloc[shown]):
        axes.text(x, y, title, fontsize=8)
    axes.set(title=f"Movie factors: first two principal components ({len(popular)} most-rated movies; labelled: top {n_shown})",
             xlabel="PC 1", ylabel="PC 2")
    figure.savefig(path, format="png", dpi=100, bbox_inches="tight")


def write_reports(learn, trained: TrainedCollab, ratings, movies, min_ratings: int, reports_dir: Path = REPORTS_DIR) -> None:
    table = movie_table(trained, ratings, movies)
    with atomic_path(reports_dir) as staging:
        staging.mkdir()
        movie_bias_ranking(table, min_ratings=min_ratings).to_csv(staging / "movie_bias.csv", index=False)
        similar_movies(trained, table, query_titles(table), min_ratings=min_ratings).to_csv(staging / "similar_movies.csv", index=False)
        plot_pca_map(trained, table[table["n_ratings"] >= min_ratings], staging / "pca_movies.png")
        curves = Figure()
        learn.recorder.plot_loss(ax=curves.subplots())
        curves.savefig(staging / "training_curves.png", format="png", dpi=100, bbox_inches="tight")


@stage_main(STAGE, ParamsError, CollabError)
def main() -> None:
    config = load_section(CollabConfig, read_params(), "collab")
    ratings, movies = read_movielens()
    set_threads(config.threads)
    log(STAGE, f"{len(ratings)} ratings; DotProductBias n_factors={config.n_factors}, bs={config.bs}, "
        f"fit_one_cycle({config.epochs}, {config.lr}, wd={config.wd})")
    splits = random_split(len(ratings), config.valid_pct, config.seed)
    live = DVCLiveCallback(dir=str(DVCLIVE_DIR), dvcyaml=False, save_dvc_exp=False)  # its own Live, ended after fit
    learn, errors = train_and_evaluate(ratings, splits, config, cbs=[live])
    trained = trained_collab(learn)
    save_model(trained)
    write_reports(learn, trained, ratings, movies, config.report_min_ratings)
    write_json(METRICS_FILE, {
        **errors,
        "n_ratings": len(ratings), "n_users": int(ratings["user"].nunique()), "n_movies": int(ratings["movie"].nunique()),
        "n_train": len(splits[0]), "n_valid": len(splits[1]), "threads": torch_threads(), "params": asdict(config),
    })
    log(STAGE, f"validation RMSE {errors['rmse']:.4f} (MSE {errors['mse']:.4f}) in {errors['train_seconds']:.1f} s; "
        f"wrote {MODEL_FILE}, {METRICS_FILE}, {REPORTS_DIR}/")


if __name__ == "__main__":
    main()
