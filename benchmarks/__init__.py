"""Benchmarks of the paddy pipeline: speed and memory targets live here, not in the timed test suite.

Not part of the installed package: run from the repository root with `python -m benchmarks [names]` (or
`make bench`). Each module has `run() -> dict` and uses the pipeline's public functions only.
"""
