"""Benchmarks of the paddy pipeline (docs/benchmarks.md): speed and memory targets live here, not in the tests.

Not part of the installed package: run from the repository root, `python -m benchmarks [names]` or `make bench`.
Each module has `run() -> dict` and uses the pipeline's public functions only; below, what several of them share.
"""

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import pandas as pd
import yaml

from pipeline.common import log, stage_main
from pipeline.params import PARAMS_FILE

REPO_ROOT = Path(__file__).resolve().parent.parent
PHOTO_SIZE = (480, 640)  # (w, h), as data.synthetic.image_size takes it: the competition's portrait photos


class WorkspaceError(RuntimeError):
    """A benchmark cannot run (no git, a failing command, a bad option): one line saying what to fix."""


def cli(run: Callable[..., Any], *options: tuple, show: Callable[[Any], Any] | None = None, errors=()) -> None:
    """A benchmark's command line: argparse's (*flags, settings) passed to run() by dest, its result shown (default:
    a line a figure); `errors`, a full disk and an interrupt end it with one line (pipeline's stage_main)."""
    show = show or (lambda result: print(pd.json_normalize(result).T.to_string(header=False)))
    module = sys.modules[run.__module__]
    name = module.__spec__.name.removesuffix(".__main__")
    parser = argparse.ArgumentParser(prog=f"python -m {name}", description=module.__doc__.splitlines()[0])
    for *flags, settings in options:
        parser.add_argument(*flags, **settings)
    arguments = vars(parser.parse_args())
    stage_main(name.replace("benchmarks.", "bench "), WorkspaceError, *errors)(lambda: show(run(**arguments)))()


def stage_env(workdir: Path) -> dict:
    """The stages import the workspace's code and run with this interpreter (dvc.yaml says `python -m ...`)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PYTHONPATH": str(workdir), "PATH": path, "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1"}


def copy_repo(repo: Path, workdir: Path) -> int:
    """Copy the repository's tracked and untracked-not-ignored files into workdir (never data/, models/ or the DVC
    cache: the user's workspace is only read); returns how many."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, check=True,
                                capture_output=True, text=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        raise WorkspaceError(f"{repo}: `git ls-files` failed; run the benchmark from a git checkout") from None
    files = [path for path in listed.split("\0") if path and (repo / path).is_file()]  # not a deleted tracked file
    for relative in files:
        (workdir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / relative, workdir / relative)
    return len(files)


def make_workspace(workdir: Path, params: Mapping[str, Any], header: str) -> None:
    """A git + DVC repository in workdir: a copy of this one, `params` as its params.yaml under `header`, one commit
    (why not `dvc exp run --temp`: docs/benchmarks.md)."""
    copy_repo(REPO_ROOT, workdir)
    (workdir / PARAMS_FILE).write_text(header + yaml.safe_dump(dict(params), sort_keys=False))
    commit = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench"]
    # Hard links: the large members' weights are not copied a second time into the workspace's DVC cache.
    for command in (["git", "init", "-q"], ["git", "add", "-A"], commit,
                    [sys.executable, "-m", "dvc", "config", "--local", "cache.type", "hardlink,copy"]):
        done = subprocess.run(command, cwd=workdir, env=stage_env(workdir), capture_output=True, text=True)
        if done.returncode:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise WorkspaceError(f"{workdir}: `{' '.join(command[-3:])}` failed ({reason})")


def error_line(lines: Sequence[str], returncode: int) -> str:
    """Why a stage failed, in one line: the last line it printed (a traceback's exception, its own refusal), not its
    `[stage]` progress; else DVC's error (a process the kernel killed prints nothing); else the exit code."""
    stripped = [line.strip() for line in lines if line.strip() and not line.startswith("[")]
    own = [line for line in stripped if not line.startswith("ERROR: ")]
    dvc = [line.removeprefix("ERROR: ") for line in stripped if line.startswith("ERROR: ")]
    return textwrap.shorten((own or dvc or [f"exited with code {returncode}"])[-1], 300)


def stage_times(timed_lines: Iterable[tuple[float, str]], finished_at: float) -> dict[str, float]:
    """Seconds per stage from (time seen, line) pairs of `dvc repro` output: DVC runs stages one after another and
    announces each with "Running stage '<name>'", so a stage lasts from its announcement to the next (or the end)."""
    starts = [(seen, match.group(1)) for seen, line in timed_lines
              if (match := re.search(r"Running stage '([^']+)'", line))]
    ends = [seen for seen, _ in starts[1:]] + [finished_at]
    return {name: round(end - start, 2) for (start, name), end in zip(starts, ends)}


class StageRun(NamedTuple):
    seconds: float
    error: str | None  # None when it passed (or was killed as asked)
    killed: bool = False
    stages: dict[str, float] = {}  # each stage DVC ran and its seconds (stage_times, to the poll's 0.2 s)


def run_stage(workdir: Path, stage: str | None, log_file: Path, kill_when: Callable[[], bool] | None = None,
              options: Sequence[str] = ("--single-item",), echo: bool = False) -> StageRun:
    """`dvc repro <options> <stage>` (no stage: the whole DAG) in workdir, its output into log_file (and onto
    stdout when `echo`), each line stamped when the poll first sees it; SIGKILL to it once `kill_when()`. In a
    session of its own: the kill (or the rehearsal's interruption) reaches DVC, the stage and its workers only."""
    stage_name = stage or "dvc repro"
    log("bench", f"{stage_name}: running, log in {log_file}")
    started, killed, stamped, partial = time.perf_counter(), False, [], [""]

    def read_new_lines(final: bool = False):  # what was appended since the last poll, not the whole log again
        *new, partial[0] = (partial[0] + reader.read()).split("\n")  # the last line may be half written
        if final and partial[0]:
            new.append(partial[0])
        stamped.extend((time.perf_counter() - started, line) for line in new)
        if echo:
            print("".join(f"  | {line}\n" for line in new), end="", flush=True)

    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as output, open(log_file, errors="replace") as reader:
        process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", *options, *filter(None, [stage])],
                                   cwd=workdir, env=stage_env(workdir), stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            while process.poll() is None and not (killed := kill_when is not None and kill_when()):
                time.sleep(0.2)
                read_new_lines()
        finally:  # the kill asked for, or an exception here (the rehearsal interrupted)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        read_new_lines(final=True)
    seconds = round(time.perf_counter() - started, 1)
    error = None if killed or process.returncode == 0 else error_line(log_file.read_text().splitlines(),
                                                                      process.returncode)
    log("bench", f"{stage_name}: {seconds} s, {'killed' if killed else 'ok' if error is None else 'failed: ' + error}")
    return StageRun(seconds, error, killed, stage_times(stamped, seconds))


def seeds_learner(folder: Path, arch: str, item_tfms, size: int, min_scale: float, bs: int, accum: int = 1,
                  pretrained: bool = False, workers: int = 0):
    """The seeds' train() up to its fit: ImageDataLoaders.from_folder(valid_pct=0.2, seed=42) at `bs // accum`
    images a step, vision_learner (GradientAccumulation to `bs` when accum > 1), unfreeze."""
    from fastai.vision.all import GradientAccumulation, ImageDataLoaders, aug_transforms, error_rate, vision_learner
    from pipeline.torch_setup import quiet_progress

    dls = ImageDataLoaders.from_folder(folder, valid_pct=0.2, seed=42, item_tfms=item_tfms, num_workers=workers,
                                       batch_tfms=aug_transforms(size=size, min_scale=min_scale), bs=bs // accum)
    cbs = GradientAccumulation(bs) if accum > 1 else []
    learn = vision_learner(dls, arch, metrics=error_rate, cbs=cbs, pretrained=pretrained)
    quiet_progress(learn)
    learn.unfreeze()
    return learn
