"""`make bench`: every benchmark in one run (`python -m benchmarks collab train` a subset), results in bench/*.json."""

from __future__ import annotations

import argparse
import importlib
import json
import time

from pipeline.common import write_json

# What each compares: docs/benchmarks.md. Each module also runs alone: `python -m benchmarks.loader`.
BENCHMARKS = ("collab", "train", "loader", "dag", "ddp", "accuracy")


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
        print(f">> bench {name} (benchmarks.{name})", flush=True)
        summary[name] = importlib.import_module(f"benchmarks.{name}").run()
        print(f"<< bench {name}: {time.perf_counter() - started:.1f} s", flush=True)
    write_json("bench/summary.json", summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
