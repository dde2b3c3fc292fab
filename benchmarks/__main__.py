"""`make bench`: every benchmark in one run (`python -m benchmarks collab train` a subset), results in bench/*.json."""

import importlib
import time

from benchmarks import cli
from pipeline.common import write_json

# What each compares: docs/benchmarks.md. Each module also runs alone: `python -m benchmarks.loader`.
BENCHMARKS = ("collab", "train", "loader", "dag", "ddp", "accuracy")


def run(names: list[str]) -> dict:
    """Each benchmark's run() with its defaults, in BENCHMARKS' order; their results also in bench/summary.json."""
    if unknown := sorted(set(names) - set(BENCHMARKS)):
        raise SystemExit(f"python -m benchmarks: unknown benchmark {unknown[0]!r}; use any of: {', '.join(BENCHMARKS)}")
    summary = {}
    for name in names or BENCHMARKS:
        started = time.perf_counter()
        print(f">> bench {name} (benchmarks.{name})", flush=True)
        summary[name] = importlib.import_module(f"benchmarks.{name}").run()
        print(f"<< bench {name}: {time.perf_counter() - started:.1f} s", flush=True)
    write_json("bench/summary.json", summary)
    return summary


cli(run, ("names", dict(nargs="*", help=f"benchmarks to run, of: {', '.join(BENCHMARKS)} (default: all)")))
