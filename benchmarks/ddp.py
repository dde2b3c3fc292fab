"""Benchmark: one member trained by the stage's own command in 1 process and in 2 processes (DDP over gloo, CPU).

`python -m pipeline.train <member>` in a scratch project on the demo's synthetic data: one process with all the
CPU's threads, one with one thread, and `train.devices: 2` with half the threads each (what the launcher sets). On a
CPU it shows the same optimiser steps, a comparable accuracy and the second process's cost, not a speed-up.
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import REPO_ROOT, cli
from pipeline.common import read_json, write_json
from pipeline.params import read_params
from pipeline.synthetic import write_synthetic_dataset

RUN_FIELDS = ("processes", "process_step_images", "optimizer_steps", "train_seconds", "images_per_second",
              "predict_seconds", "valid_accuracy")


def run(member: str | None = None, epochs: int | None = None) -> dict:
    """The three runs (module docstring) and the gains of two processes over each one-process run: bench/ddp.json."""
    params, cores = read_params(), os.cpu_count() or 1
    member = member or next(iter(params["train"]["members"]))
    chosen = params["train"]["members"][member]
    chosen |= dict(accum=chosen.get("accum") or 1) | ({} if epochs is None else dict(epochs=epochs))
    params["train"]["members"] = {member: chosen}
    runs = {}
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(scratch) / "paddy"
        write_synthetic_dataset(data_dir, **params["data"]["synthetic"], seed=params["seed"])
        for name, processes, threads in (("one_process_all_threads", 1, cores), ("one_process_one_thread", 1, 1),
                                         ("two_processes", 2, max(1, cores // 2))):
            # The stage's own command in a project folder of its own, on the shared data, `threads` threads a process
            project, run_params = Path(scratch) / name, params | {"train": params["train"] | {"devices": processes}}
            (project / "data").mkdir(parents=True)
            (project / "data" / "paddy").symlink_to(data_dir)
            (project / "params.yaml").write_text(yaml.safe_dump(run_params, sort_keys=False))
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "pipeline.train", member], cwd=project, check=True,
                           env=dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=str(threads)))
            runs[name] = dict(wall_seconds=round(time.perf_counter() - started, 1), threads_per_process=threads)
            metrics = read_json(project / "metrics" / "train" / f"{member}.json")
            runs[name] |= {key: metrics[key] for key in RUN_FIELDS}
    two = runs["two_processes"]
    # Each ratio is the two-process run's gain over a one-process run (above 1: faster with two processes).
    comparisons = {f"vs_{name}": dict(
        fit_speedup=round(two["images_per_second"] / one["images_per_second"], 2),
        wall_speedup=round(one["wall_seconds"] / two["wall_seconds"], 2),
        predict_speedup=round(one["predict_seconds"] / two["predict_seconds"], 2),
        same_optimizer_steps=one["optimizer_steps"] == two["optimizer_steps"],
        accuracy_difference=round(two["valid_accuracy"] - one["valid_accuracy"], 4),
    ) for name, one in runs.items() if name != "two_processes"}
    result = dict(member=member, cores=cores, epochs=chosen["epochs"], runs=runs, **comparisons)
    write_json("bench/ddp.json", result)
    return result


if __name__ == "__main__":
    cli(run, ("member", dict(nargs="?", help="member under train.members (default: the first)")),
        ("--epochs", dict(type=int, help="instead of the member's epochs (a shorter run)")))
