"""Benchmark: our DotProductBias (params.yaml `collab`) against fastai's collab_learner, same split, same run.

The reference is the seeds' setup: collab_learner(dls, n_factors=50, y_range=(0, 5.5)), bs 64,
fit_one_cycle(5, 5e-3, wd=0.1). Both train on the same seeded 80/20 split of data/movielens with the same number
of torch threads, one after the other in this process, and are timed the same way (fit_one_cycle only).
`--cv K` adds K-fold cross-validated RMSE for our model. Writes bench/collab.json.

Run: `python -m benchmarks.collab [--cv 5]` (or `make bench`, which calls run()).
"""

from __future__ import annotations

import argparse
import platform
from dataclasses import asdict, replace
from pathlib import Path

from fastai.collab import collab_learner
from fastai.metrics import rmse

from pipeline import collab
from pipeline.common import log, write_json
from pipeline.torch_setup import quiet_progress
from pipeline.params import ParamsError, load_section, profile_of, read_params

STAGE = "bench_collab"
BENCH_FILE = Path("bench/collab.json")
REFERENCE = {"n_factors": 50, "y_range": (0.0, 5.5), "bs": 64, "epochs": 5, "lr": 5e-3, "wd": 0.1}


def reference_learner(dls, config: collab.CollabConfig):
    """fastai's own dot-product model, as the seeds call it."""
    learn = collab_learner(dls, n_factors=config.n_factors, y_range=tuple(config.y_range), metrics=rmse)
    quiet_progress(learn)
    return learn


def measure(ratings, splits, config: collab.CollabConfig, learner) -> dict:
    dls = collab.collab_dataloaders(ratings, splits, config.bs, config.seed)
    learn = learner(dls, config)
    seconds = collab.fit(learn, config)
    return {**collab.validation_errors(learn), "train_seconds": seconds,
            "params": {k: getattr(config, k) for k in REFERENCE}}


def run(cv_folds: int = 0) -> dict:
    """Train both models on the real data and return the figures (also written to bench/collab.json)."""
    params = read_params()
    config = load_section(collab.CollabConfig, params, "collab")
    collab.set_threads(config.threads)
    ratings, _ = collab.read_movielens()
    splits = collab.random_split(len(ratings), config.valid_pct, config.seed)
    reference_config = replace(config, **REFERENCE)
    log(STAGE, f"collab_learner (dot product), bs {reference_config.bs}, on {len(ratings)} ratings")
    reference = measure(ratings, splits, reference_config, reference_learner)
    log(STAGE, f"  RMSE {reference['rmse']:.4f} in {reference['train_seconds']:.1f} s")
    log(STAGE, f"ours (DotProductBias), bs {config.bs}, lr {config.lr}")
    ours = measure(ratings, splits, config, collab.make_learner)
    log(STAGE, f"  RMSE {ours['rmse']:.4f} in {ours['train_seconds']:.1f} s")
    figures = {
        "profile": profile_of(params),
        "n_ratings": len(ratings), "n_valid": len(splits[1]),
        "threads": collab.torch_threads(), "cpu": platform.processor() or platform.machine(),
        "collab_learner": reference, "ours": ours,
        "rmse_gain": reference["rmse"] - ours["rmse"],
        "speedup": reference["train_seconds"] / ours["train_seconds"],
        "stage_params": asdict(config),
    }
    if cv_folds:
        log(STAGE, f"ours: {cv_folds}-fold cross-validation")
        figures["ours_cross_validated"] = collab.cross_validated_rmse(ratings, config, cv_folds)
    write_json(BENCH_FILE, figures)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cv", type=int, default=0, metavar="K", help="also K-fold cross-validated RMSE (e.g. 5)")
    args = parser.parse_args()
    try:
        figures = run(args.cv)
    except (ParamsError, collab.CollabError) as err:
        raise SystemExit(f"{STAGE}: {err}") from None
    ours, reference = figures["ours"], figures["collab_learner"]
    print(f"collab_learner: RMSE {reference['rmse']:.4f} in {reference['train_seconds']:.1f} s | "
          f"ours: RMSE {ours['rmse']:.4f} in {ours['train_seconds']:.1f} s ({figures['speedup']:.1f}x faster)")
    if "ours_cross_validated" in figures:
        cv = figures["ours_cross_validated"]
        print(f"ours, {cv['folds']}-fold CV RMSE: {cv['rmse_mean']:.4f} ± {cv['rmse_std']:.4f}")
    log(STAGE, f"wrote {BENCH_FILE}")


if __name__ == "__main__":
    main()
