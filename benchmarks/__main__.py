"""`make bench`: every benchmark in one run, results in bench/*.json and one summary table.

`python -m benchmarks collab train` runs a subset; each module also runs alone (`python -m benchmarks.loader`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

BENCHMARKS = {
    "collab": "benchmarks.collab",  # our DotProductBias vs fastai's collab_learner on ML-100k
    "train": "benchmarks.train",  # our train stage vs the seeds' plain train(): images/s
    "loader": "benchmarks.loader",  # each member's DataLoader vs its training step, images/s at 480x640
    "dag": "benchmarks.dag",  # the whole demo DAG from a fresh clone: wall time
    "ddp": "benchmarks.ddp",  # one member in 1 process vs 2 (DDP over gloo): wall time, images/s
    "accuracy": "benchmarks.accuracy",  # the demo DAG vs the seeds' train() on real digit scans: accuracy, wall time
}
RESULTS_DIR = Path("bench")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run, of: {', '.join(BENCHMARKS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r}; use any of: {', '.join(BENCHMARKS)}")
    summary = {}
    for name in args.names or BENCHMARKS:
        started = time.perf_counter()
        print(f">> bench {name} ({BENCHMARKS[name]})", flush=True)
        summary[name] = importlib.import_module(BENCHMARKS[name]).run()
        print(f"<< bench {name}: {time.perf_counter() - started:.1f} s", flush=True)
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
