"""Benchmark: our DotProductBias (params.yaml `collab`) against fastai's collab_learner, same split, same run.

The seeds' setup (REFERENCE) and ours on one seeded 80/20 split of data/movielens, same torch threads, fit_one_cycle
timed. Writes bench/collab.json.
"""

import platform
from dataclasses import asdict, replace

from fastai.collab import collab_learner
from fastai.metrics import rmse

from benchmarks import cli
from pipeline import collab
from pipeline.common import log, write_json
from pipeline.params import ParamsError, load_section, profile_of, read_params
from pipeline.torch_setup import quiet_progress

STAGE = "bench collab"
REFERENCE = {"n_factors": 50, "y_range": (0.0, 5.5), "bs": 64, "epochs": 5, "lr": 5e-3, "wd": 0.1}


def run(cv_folds: int = 0) -> dict:
    """Train both models on the real data and return the figures (also written to bench/collab.json)."""
    params = read_params()
    config = load_section(collab.CollabConfig, params, "collab")
    collab.set_threads(config.threads)
    ratings, _ = collab.read_movielens()
    splits = collab.random_split(len(ratings), config.valid_pct, config.seed)
    log(STAGE, f"collab_learner, then ours, on {len(ratings)} ratings")
    # fastai's own dot-product model as the seeds call it, trained and scored as collab.train_and_evaluate does
    seeds = replace(config, **REFERENCE)
    learn = collab_learner(collab.collab_dataloaders(ratings, splits, seeds.bs, seeds.seed),
                           n_factors=seeds.n_factors, y_range=seeds.y_range, metrics=rmse)
    quiet_progress(learn)
    seconds = collab.fit(learn, seeds)  # before validation_errors: the RMSE is the trained model's
    reference = {**collab.validation_errors(learn), "train_seconds": seconds, "params": REFERENCE}
    ours = collab.train_and_evaluate(ratings, splits, config)[1]
    ours["params"] = {key: getattr(config, key) for key in REFERENCE}
    figures = {"profile": profile_of(params), "n_ratings": len(ratings), "n_valid": len(splits[1]),
               "threads": collab.torch_threads(), "cpu": platform.processor() or platform.machine(),
               "collab_learner": reference, "ours": ours, "rmse_gain": reference["rmse"] - ours["rmse"],
               "speedup": reference["train_seconds"] / ours["train_seconds"], "stage_params": asdict(config)}
    if cv_folds:
        log(STAGE, f"ours: {cv_folds}-fold cross-validation")
        figures["ours_cross_validated"] = collab.cross_validated_rmse(ratings, config, cv_folds)
    write_json("bench/collab.json", figures)
    return figures


if __name__ == "__main__":
    cli(run, ("--cv", dict(dest="cv_folds", type=int, default=0, metavar="K", help="also K-fold CV RMSE (e.g. 5)")),
        errors=(ParamsError, collab.CollabError))
