"""Stage `params`: every key of params.yaml checked, by the loader of the stage that reads it, before any stage runs.

A typo in `collab` or in `ensemble.weights` would otherwise surface only when that stage runs, possibly after hours
of training. Each stage's own loader does the checking, so every rule lives once, with its stage; a top-level key
that no stage reads (a misspelt section) is an error too. The output, checks/params.txt, holds the same text
whatever the params: DVC reruns this stage after any params edit, and paddy_data and movielens_data, which depend
on it only so that they run after it, do not rerun because of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline import collab, ensemble, movielens_data, paddy_data, probe, train, vision
from pipeline.common import atomic_path, log, stage_main
from pipeline.params import PARAMS_FILE, ParamsError, read_params

STAGE = "params"
OUTPUT = Path("checks/params.txt")
VERDICT = f"{PARAMS_FILE}: every key passed the loader of the stage that reads it (python -m pipeline.check_params)\n"


class ReadRecorder(Mapping):
    """The top level of params.yaml, remembering which keys the loaders asked for."""

    def __init__(self, params: Mapping[str, Any]):
        self._params = params
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return self._params[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)


def check_params(params: Mapping[str, Any]) -> None:
    """Load every stage's config from `params`; the first bad key raises a one-line ParamsError."""
    recorder = ReadRecorder(params)
    paddy_data.load_config(recorder)
    shared = vision.load_train_config(recorder)
    probe.load_probe_config(recorder, shared.bs)
    for name in shared.members:
        train.load_stage_config(recorder, name)
    ensemble.load_config(recorder)
    movielens_data.load_config(recorder)
    collab.load_config(recorder)
    unread = [key for key in params if key not in recorder.read]
    if unread:
        raise ParamsError(
            f"{PARAMS_FILE}: unknown section '{unread[0]}': no stage reads it; remove it or use one of: "
            f"{', '.join(sorted(recorder.read))}"
        )


@stage_main(STAGE, ParamsError)
def main() -> None:
    check_params(read_params())
    with atomic_path(OUTPUT) as tmp:
        tmp.write_text(VERDICT)
    log(STAGE, f"{PARAMS_FILE}: every section is valid")


if __name__ == "__main__":
    main()
