"""Stage `params`: every key of params.yaml checked by the loader of the stage that reads it, before any stage runs.

Otherwise a typo in `collab` surfaces only when that stage runs, maybe after hours of training; a section that no
stage reads is an error too. No torch (members.py, collab_config.py hold the training stages' configs); timm's and
albumentations' names are checked as each probe and train starts. checks/params.txt never changes, so the stages
that depend on it (to run after it) never rerun because of it.
"""

from __future__ import annotations

from collections import UserDict
from pathlib import Path
from typing import Any, Mapping

from pipeline import collab_config, ensemble, members, movielens_data, paddy_data, small_images
from pipeline.common import atomic_path, log, stage_main
from pipeline.paddy import ValidationConfig
from pipeline.params import PARAMS_FILE, ParamsError, load_section, read_params

STAGE = "params"
OUTPUT = Path("checks/params.txt")
VERDICT = f"{PARAMS_FILE}: every key passed the loader of the stage that reads it (python -m pipeline.check_params)\n"


class ReadRecorder(UserDict):
    """The top level of params.yaml, remembering which keys the loaders asked for (`get` reads through here too)."""

    def __init__(self, params: Mapping[str, Any]):
        super().__init__(params)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return super().__getitem__(key)


def check_params(params: Mapping[str, Any]) -> None:
    """Load every stage's config from `params`; the first bad key raises a one-line ParamsError."""
    recorder = ReadRecorder(params)
    paddy_data.load_config(recorder)
    small_images.load_config(recorder)
    shared = members.load_train_config(recorder)
    # With `devices: auto` the process count is the GPU count, which only torch reads: the probe applies the same
    # rule with it; here, the one process it is at least.
    members.load_probe_config(recorder, shared.bs, shared.devices if isinstance(shared.devices, int) else 1)
    load_section(ValidationConfig, recorder, "validation")  # what train@<member> reads besides `train`
    ensemble.load_config(recorder)
    movielens_data.load_config(recorder)
    load_section(collab_config.CollabConfig, recorder, "collab")
    unread = [key for key in params if key not in recorder.read]
    if unread:
        raise ParamsError(f"{PARAMS_FILE}: unknown section '{unread[0]}': no stage reads it; remove it or use one of: "
                          f"{', '.join(sorted(recorder.read))}")


@stage_main(STAGE, ParamsError)
def main() -> None:
    check_params(read_params())
    with atomic_path(OUTPUT) as tmp:
        tmp.write_text(VERDICT)
    log(STAGE, f"{PARAMS_FILE}: every section is valid")


if __name__ == "__main__":
    main()
