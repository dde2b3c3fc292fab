"""Benchmark: the whole demo DAG (both branches) from a fresh clone of HEAD, timed stage by stage.

Each stage timed from DVC's own "Running stage" lines (benchmarks.run_stage), then a second `dvc repro` that must run
nothing. Target: under 10 minutes on 2 CPU cores (aim: 5). Writes bench/dag.json.
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from benchmarks import cli, run_stage
from pipeline.common import write_json

BUDGET_S, TARGET_S = 600, 300


def run(repo_dir: Path = Path("."), result_file: Path = Path("bench/dag.json")) -> dict:
    """Clone HEAD of `repo_dir`, `dvc repro` it twice, write and return the timings; raise if a repro fails."""
    clone = Path(tempfile.mkdtemp(prefix="paddy-bench-dag.")) / "clone"
    subprocess.run(["git", "clone", "--quiet", str(Path(repo_dir).resolve()), str(clone)], check=True)
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True,
                              check=True).stdout.strip()
    repro = run_stage(clone, None, clone.parent / "repro.log", options=(), echo=True)
    result = {"git_revision": revision, "cpu_count": os.cpu_count(), "total_s": repro.seconds, "stages": repro.stages,
              "budget_s": BUDGET_S, "target_s": TARGET_S, "within_budget": not repro.error and repro.seconds < BUDGET_S,
              "ok": repro.error is None}
    if repro.error is None:
        noop = run_stage(clone, None, clone.parent / "noop.log", options=(), echo=True)
        # paddy_source runs at every `dvc repro` (always_changed: it fingerprints a local data.source), by design.
        result |= {"noop_repro_s": noop.seconds, "noop_reran_stages": sorted(set(noop.stages) - {"paddy_source"})}
        result["ok"] = noop.error is None and not result["noop_reran_stages"]
    else:
        result["log_tail"] = (clone.parent / "repro.log").read_text().splitlines()[-40:]
    write_json(result_file, result)
    if not result["ok"]:
        raise RuntimeError(f"the demo DAG failed or reran stages in {clone}; see {result_file}")
    shutil.rmtree(clone.parent, ignore_errors=True)
    return result


if __name__ == "__main__":
    cli(run, errors=(RuntimeError,))
