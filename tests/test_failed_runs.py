"""A stage that fails under `dvc repro` leaves the previous metrics, plots and submissions in place.

These outputs are `cache: false` (tracked by git for `dvc metrics diff`), so `dvc checkout` cannot bring them back
once DVC has removed them before running the stage.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.synthetic import write_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
MEMBER = "convnext_squish"
TINY_SYNTHETIC = {"train_per_class": 4, "n_test": 5, "image_size": [32, 40]}


def _untracked_outputs(stage: dict) -> list[tuple[str, dict]]:
    """(path, options) of every metrics and plots file of a stage, and of its outs with `cache: false`."""
    found = []
    for section in ("outs", "metrics", "plots"):
        for entry in stage.get(section, []):
            path, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
            if section != "outs" or options.get("cache") is False:
                found.append((path, options))
    return found


def test_every_output_dvc_cannot_restore_persists_through_a_rerun():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    checked = []
    for name, stage in stages.items():
        for path, options in _untracked_outputs(stage.get("do", stage)):
            checked.append(path)
            assert options.get("persist") is True, f"dvc.yaml: stage {name}: {path} needs `persist: true`"
    assert "submissions/submission.csv" in checked and "metrics/data.json" in checked


def _scratch_repo(tmp_path: Path, params: dict) -> Path:
    """This project's code and dvc.yaml in a fresh git + DVC repo, with `params` as its params.yaml."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    _dvc(repo, "init", "-q")
    return repo


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    # PYTHONPATH: the stages' `python -m pipeline.<stage>` must import the scratch copy, not the installed project.
    env = {**os.environ, "PYTHONPATH": str(repo), "DVC_NO_ANALYTICS": "1"}
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, env=env)


def _tiny_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["synthetic"] = dict(TINY_SYNTHETIC)
    return params


def _contents(repo: Path, *patterns: str) -> dict[str, bytes]:
    return {str(p.relative_to(repo)): p.read_bytes() for pattern in patterns for p in sorted(repo.glob(pattern))}


@pytest.mark.slow
def test_paddy_data_refusing_a_truncated_image_keeps_the_last_metrics(tmp_path):
    broken = tmp_path / "broken"
    write_synthetic_dataset(broken, seed=0, **{**TINY_SYNTHETIC, "image_size": (32, 40)})
    image = next((broken / "train_images" / "blast").iterdir())
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    params = _tiny_params()
    params["data"]["source"] = str(broken)
    repo = _scratch_repo(tmp_path, params)
    # The last good run's output (DVC removes a stage's outputs whether or not it wrote them).
    (repo / "metrics").mkdir()
    (repo / "metrics" / "data.json").write_text('{"source": "synthetic"}\n')
    before = _contents(repo, "metrics/data.json")

    failed = _dvc(repo, "repro", "paddy_data")

    assert failed.returncode != 0 and "not a readable image" in failed.stdout + failed.stderr
    assert _contents(repo, "metrics/data.json") == before


@pytest.mark.slow
def test_a_probe_with_an_arch_typo_keeps_the_last_metrics_and_plots(tmp_path):
    params = _tiny_params()
    params["train"]["members"][MEMBER]["arch"] = "convnext_atoo"
    repo = _scratch_repo(tmp_path, params)
    write_synthetic_dataset(repo / "data" / "paddy", seed=0, **{**TINY_SYNTHETIC, "image_size": (32, 40)})
    # The last good run's outputs (DVC removes a stage's outputs whether or not it wrote them).
    (repo / "metrics" / "probe").mkdir(parents=True)
    (repo / "metrics" / "probe" / f"{MEMBER}.json").write_text('{"accum": 1}\n')
    (repo / "plots" / "probe").mkdir(parents=True)
    (repo / "plots" / "probe" / f"{MEMBER}.csv").write_text("accum,peak_gib\n1,0.5\n")
    (repo / "plots" / "probe" / f"{MEMBER}.png").write_bytes(b"\x89PNG last good plot")
    before = _contents(repo, "metrics/probe/*", "plots/probe/*")

    failed = _dvc(repo, "repro", "--single-item", f"probe@{MEMBER}")

    assert failed.returncode != 0 and "convnext_atoo" in failed.stdout + failed.stderr
    assert _contents(repo, "metrics/probe/*", "plots/probe/*") == before
