"""Benchmark: the whole demo DAG (both branches) from a fresh clone of HEAD, timed stage by stage.

Each stage timed from DVC's own "Running stage" lines, then a second `dvc repro` that must run nothing. Target: under
10 minutes on 2 CPU cores (aim: 5). Writes bench/dag.json.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

from benchmarks import cli, stage_env
from pipeline.common import write_json

BUDGET_S, TARGET_S = 600, 300
RUNNING_STAGE = re.compile(r"Running stage '([^']+)'")


def stage_times(timed_lines: Iterable[tuple[float, str]], finished_at: float) -> dict[str, float]:
    """Seconds per stage from (time seen, line) pairs of `dvc repro` output: DVC runs stages one after another and
    announces each with "Running stage '<name>'", so a stage lasts from its announcement to the next one (or the end)."""
    starts = [(seen, match.group(1)) for seen, line in timed_lines if (match := RUNNING_STAGE.search(line))]
    ends = [seen for seen, _ in starts[1:]] + [finished_at]
    return {name: round(end - start, 2) for (start, name), end in zip(starts, ends)}


def timed_repro(clone: Path) -> tuple[int, list[tuple[float, str]], float]:
    """`dvc repro` in clone, each output line stamped with the seconds since the start: (returncode, lines, total).
    Unbuffered (stage_env), so each line arrives when it is printed and its time stamp means something."""
    started, lines = time.perf_counter(), []
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=clone, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, bufsize=1, env=stage_env(clone))
    for line in process.stdout:
        lines.append((time.perf_counter() - started, line.rstrip("\n")))
        print(f"  | {line}", end="", flush=True)
    return process.wait(), lines, round(time.perf_counter() - started, 2)


def run(repo_dir: Path = Path("."), result_file: Path = Path("bench/dag.json")) -> dict:
    """Clone HEAD of `repo_dir`, `dvc repro` it twice, write and return the timings; raise if a repro fails."""
    clone = Path(tempfile.mkdtemp(prefix="paddy-bench-dag.")) / "clone"
    subprocess.run(["git", "clone", "--quiet", str(Path(repo_dir).resolve()), str(clone)], check=True)
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=clone, capture_output=True, text=True,
                              check=True).stdout.strip()
    returncode, lines, total = timed_repro(clone)
    result = {"git_revision": revision, "cpu_count": os.cpu_count(), "total_s": total,
              "stages": stage_times(lines, total), "budget_s": BUDGET_S, "target_s": TARGET_S,
              "within_budget": returncode == 0 and total < BUDGET_S, "ok": returncode == 0}
    if returncode == 0:
        noop_code, noop_lines, result["noop_repro_s"] = timed_repro(clone)
        # paddy_source runs at every `dvc repro` (always_changed: it fingerprints a local data.source), by design.
        result["noop_reran_stages"] = sorted(set(stage_times(noop_lines, 0)) - {"paddy_source"})
        result["ok"] = noop_code == 0 and not result["noop_reran_stages"]
    else:
        result["log_tail"] = [line for _, line in lines[-40:]]
    write_json(result_file, result)
    if not result["ok"]:
        raise RuntimeError(f"the demo DAG failed or reran stages in {clone}; see {result_file}")
    shutil.rmtree(clone.parent, ignore_errors=True)
    return result


if __name__ == "__main__":
    cli(run, errors=(RuntimeError,))
