"""`make bench`: every benchmark in one run, results in bench/*.json and one summary table.

Speed and memory targets live here, not in the timed test suite. Each benchmark module has `run() -> dict`;
`python -m pipeline.bench collab train` runs a subset.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

BENCHMARKS = {
    "collab": "pipeline.bench_collab",  # our DotProductBias vs fastai's collab_learner on ML-100k
    "train": "pipeline.bench_train",  # our train stage vs the seeds' plain train(): images/s
    "dag": "pipeline.bench_dag",  # the whole demo DAG from a fresh clone: wall time
    "ddp": "pipeline.bench_ddp",  # one member in 1 process vs 2 (DDP over gloo): wall time, images/s
}
RESULTS_DIR = Path("bench")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
