"""A local data.source folder is a dependency of paddy_data: an edit inside it reruns paddy_data, nothing else does.

DVC cannot depend on a path only some values of data.source name; the always_changed `paddy_source` stage
fingerprints the source at every `dvc repro` and paddy_data depends on that fingerprint.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RUNNING_STAGE = re.compile(r"Running stage '([^']+)'")


def _dvc_repro(repo: Path) -> list[str]:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(repo)}
    result = subprocess.run(["dvc", "repro", "paddy_data"], cwd=repo, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return RUNNING_STAGE.findall(result.stdout)


@pytest.mark.slow
def test_an_edit_inside_a_local_source_folder_reruns_paddy_data_and_nothing_else_does(tiny_paddy, tmp_path):
    source = Path(shutil.copytree(tiny_paddy, tmp_path / "my_copy"))
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "pipeline", repo / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["source"] = str(source)
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=repo, check=True)

    assert "paddy_data" in _dvc_repro(repo)
    assert _dvc_repro(repo) == ["paddy_source"]  # the fingerprint is taken, unchanged: paddy_data is not rerun

    train = pd.read_csv(source / "train.csv")
    train.loc[0, "age"] = 99  # same ids and labels, another value
    train.to_csv(source / "train.csv", index=False)
    assert _dvc_repro(repo) == ["paddy_source", "paddy_data"]
    assert pd.read_csv(repo / "data" / "paddy" / "train.csv").loc[0, "age"] == 99
