"""Benchmark: accuracy on real images: the demo profile's DAG next to the seeds' plain fastai `train()`, same data.

scikit-learn's load_digits in the competition's layout, TEST_PCT held out with its labels: `dvc repro ensemble` in a
scratch workspace, then the seeds' train() (SEEDS). Writes bench/accuracy.json; the ablations: docs/benchmarks.md.
"""

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from PIL import Image

from benchmarks import REPO_ROOT, WorkspaceError, cli, make_workspace, run_stage, seeds_learner
from pipeline.common import read_json, write_json
from pipeline.paddy import CLASSES, SUBMISSION_COLUMNS, TRAIN_COLUMNS, VARIETIES
from pipeline.params import fold_ids_for
from pipeline.profile import render_params

RESULT_FILE = Path("bench/accuracy.json")
TEST_PCT, SEED = 0.2, 42
IMAGE_SIDE = 64  # 8x8 scans upsampled (bilinear): the demo members' resize sizes are 96-128
SEEDS = {"arch": "resnet18", "epochs": 12, "lr": 0.01, "bs": 64, "resize": 96, "size": 64}  # valid_pct 0.2


def write_layout(folder: Path, images: np.ndarray, digits: np.ndarray, test_pct: float = TEST_PCT,
                 side: int = IMAGE_SIDE) -> dict[str, str]:
    """The competition's layout in `folder` from grey `images` (values 0-16, as load_digits') and their `digits`:
    train_images/<label>/<id>.png, train.csv (a seeded random variety and age: the digits have neither),
    test_images/<id>.png and sample_submission.csv. Returns the held-out test truth, image_id -> label."""
    from sklearn.model_selection import train_test_split

    table = pd.DataFrame({"image_id": [f"{100001 + index}.png" for index in range(len(images))],
                          "label": np.array(CLASSES)[digits], "pixels": list(images)})
    train, test = train_test_split(table, test_size=test_pct, stratify=digits, random_state=SEED)
    for row in table.itertuples():
        image = Image.fromarray((np.asarray(row.pixels, dtype=float) * 255 / 16).clip(0, 255).astype(np.uint8))
        path = folder / ("test_images" if row.Index in test.index else f"train_images/{row.label}") / row.image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        image.resize((side, side), Image.BILINEAR).convert("RGB").save(path)
    rng = np.random.default_rng(SEED)
    train.assign(variety=rng.choice(VARIETIES, len(train)), age=rng.integers(45, 82, len(train)))[
        list(TRAIN_COLUMNS)].to_csv(folder / "train.csv", index=False)
    test.sort_values("image_id").assign(label=CLASSES[0])[list(SUBMISSION_COLUMNS)].to_csv(
        folder / "sample_submission.csv", index=False)
    return dict(zip(test["image_id"], test["label"]))


def with_overrides(params: Mapping[str, Any], overrides: Sequence[str]) -> dict:
    """`params` with each `dotted.key=value` (the value read as YAML) set, as `dvc exp run -S` would."""
    if malformed := [override for override in overrides if "=" not in override]:
        raise SystemExit(f"bench accuracy: --set {malformed[0]!r}: use key=value, e.g. train.member_defaults.lr=0.01")
    params = OmegaConf.to_container(OmegaConf.merge(dict(params), OmegaConf.from_dotlist(list(overrides))))
    validation = params["validation"]  # `make profile` writes fold_ids from folds; a --set of folds must too
    validation["fold_ids"] = fold_ids_for(validation["folds"], validation["full"])
    return params


def accuracy(predicted: Mapping[str, str], truth: Mapping[str, str]) -> float:
    return float(np.mean([predicted[image_id] == label for image_id, label in truth.items()]))


def demo_dag(source: Path, truth: Mapping[str, str], overrides: Sequence[str], workdir: Path) -> dict:
    """`dvc repro ensemble` on the demo profile with data.source `source`: each member's and the ensemble's
    validation and test accuracy and seconds; the workspace's dvc log in workdir/repro.log."""
    params = with_overrides(render_params("demo"), [f"data.source={source}", *overrides])
    make_workspace(workdir, params, header=f"# bench accuracy: the demo profile with {list(overrides)}\n")
    seconds, error, *_ = run_stage(workdir, "ensemble", workdir / "repro.log", options=())
    if error:
        raise WorkspaceError(f"dvc repro failed in {workdir}: {error}")
    ensemble = read_json(workdir / "metrics/ensemble.json")
    submitted = lambda csv: pd.read_csv(workdir / csv, dtype=str).set_index("image_id")["label"]  # noqa: E731
    rows = {name: {"valid_accuracy": member["valid_accuracy"],
                   "test_accuracy": accuracy(submitted(f"submissions/members/{name}.csv"), truth),
                   "train_seconds": read_json(workdir / f"metrics/train/{name}.json").get("train_seconds")}
            for name, member in ensemble["members"].items()}
    rows["ensemble"] = {"valid_accuracy": ensemble["ensemble"]["valid_accuracy"],
                        "test_accuracy": accuracy(submitted("submissions/submission.csv"), truth),
                        "train_seconds": None, "dag_seconds": seconds}
    return {"rows": rows} | {key: ensemble.get(key) for key in ("best_member", "gain_over_best_member",
                                                                "weights_fitted_on")}


def seeds_train(data_dir: Path, truth: Mapping[str, str]) -> dict:
    """The seeds' train() (SEEDS) on data_dir/train_images: its own validation split's and the test's TTA accuracy."""
    from fastai.vision.all import Resize, get_image_files

    started = time.perf_counter()
    learn = seeds_learner(data_dir / "train_images", SEEDS["arch"], Resize(SEEDS["resize"], method="squish"),
                          SEEDS["size"], 0.75, SEEDS["bs"])
    learn.fit_one_cycle(SEEDS["epochs"], SEEDS["lr"])
    probs, targets = learn.tta(dl=learn.dls.valid)
    test_files = sorted(get_image_files(data_dir / "test_images"))
    test_probs, _ = learn.tta(dl=learn.dls.test_dl(test_files))
    predicted = np.array(learn.dls.vocab)[test_probs.argmax(1).numpy()]
    return {"valid_accuracy": float((probs.argmax(1) == targets).float().mean()),
            "test_accuracy": accuracy(dict(zip([path.name for path in test_files], predicted)), truth),
            "train_seconds": round(time.perf_counter() - started, 1)}


def run(overrides: Sequence[str] = (), seeds: bool = True, keep: bool = False, result_file: Path = RESULT_FILE) -> dict:
    """The whole benchmark (module docstring); writes and returns result_file's content."""
    from sklearn.datasets import load_digits

    scratch, digits = Path(tempfile.mkdtemp(prefix="paddy-bench-accuracy.")), load_digits()
    try:
        truth = write_layout(scratch / "digits", digits.images, digits.target)
        result = {"data": "sklearn load_digits", "train_images": len(digits.target) - len(truth),
                  "test_images": len(truth), "overrides": list(overrides),
                  **demo_dag(scratch / "digits", truth, overrides, scratch / "workspace")}
        if seeds:
            result["rows"]["seeds train()"] = seeds_train(scratch / "digits", truth)
    finally:
        if not keep:
            shutil.rmtree(scratch, ignore_errors=True)
    write_json(REPO_ROOT / result_file, result)
    return result


def table(result: Mapping[str, Any]) -> str:
    """One row a model, the seeds' beside ours; the ensemble's seconds are the whole DAG's."""
    rows = pd.DataFrame(result["rows"]).T.astype(float)
    rows["seconds"] = rows.pop("dag_seconds").fillna(rows.pop("train_seconds"))
    return (rows.to_string(float_format="{:.3f}".format) + f"\nensemble gain over its best member "
            f"({result['best_member']}): {result['gain_over_best_member']:+.3f}")


if __name__ == "__main__":
    cli(run, ("--set", dict(dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="a params key "
                            "over the demo profile's, e.g. train.member_defaults.lr=0.01 (repeatable)")),
        ("--no-seeds", dict(dest="seeds", action="store_false", help="skip the seeds' train() (an ablation of ours)")),
        ("--keep", dict(action="store_true", help="keep the scratch data and workspace")),
        ("--result", dict(dest="result_file", type=Path, default=RESULT_FILE, metavar="FILE",
                          help=f"the JSON written (default: {RESULT_FILE})")),
        show=lambda result: print(table(result)))
