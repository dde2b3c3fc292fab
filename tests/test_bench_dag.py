"""Spec of the DAG benchmark: per-stage times from `dvc repro` output, and a real run on a tiny two-stage repo."""

import json
import os
import subprocess

import pytest

from benchmarks import stage_times
from benchmarks.dag import run

from helpers import GIT_IDENTITY

def test_each_stage_lasts_until_the_next_one_starts():
    lines = [
        (0.5, "Running stage 'paddy_data':"),
        (0.6, "> python -m pipeline.paddy_data"),
        (3.0, "Running stage 'train@convnext_squish':"),
        (9.0, "Updating lock file 'dvc.lock'"),
    ]
    assert stage_times(lines, finished_at=10.0) == {"paddy_data": 2.5, "train@convnext_squish": 7.0}


def test_a_run_with_nothing_to_do_has_no_stages():
    assert stage_times([(0.1, "Stage 'collab' didn't change, skipping")], finished_at=1.0) == {}


@pytest.mark.slow
def test_bench_clones_head_runs_every_stage_then_checks_a_second_repro_does_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    for key, value in GIT_IDENTITY.items():
        monkeypatch.setenv(key, value)
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "dvc.yaml").write_text(
        "stages:\n"
        "  first:\n    cmd: python -c \"open('a.txt', 'w').write('a')\"\n    outs: [a.txt]\n"
        "  second:\n    cmd: python -c \"open('b.txt', 'w').write(open('a.txt').read())\"\n"
        "    deps: [a.txt]\n    outs: [b.txt]\n"
    )
    for command in (["git", "init", "-q"], ["dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "dag"]):
        subprocess.run(command, cwd=repo, check=True, env=os.environ)

    result = run(repo_dir=repo, result_file=tmp_path / "dag.json")

    assert list(result["stages"]) == ["first", "second"]
    assert result["ok"] and result["noop_reran_stages"] == []
    assert json.loads((tmp_path / "dag.json").read_text())["total_s"] == result["total_s"]
