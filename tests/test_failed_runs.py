"""A stage that fails under `dvc repro` leaves the previous metrics, plots and submissions in place.

These outputs are `cache: false` (tracked by git for `dvc metrics diff`), so `dvc checkout` cannot bring them back
once DVC has removed them before running the stage: each must be `persist: true`, which DVC then honours (DVC's own
behaviour, not re-proved here by failing whole stages).
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


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
