"""`make rehearsal`: the competition profile's DAG end to end, on generated full-size photos, in a scratch workspace.

Run it before spending GPU hours. It copies the repository (its tracked and untracked-not-ignored files: never
data/, models/, preds/ or the DVC cache) into a temporary folder, writes there a params.yaml rendered from the
competition profile with a few overrides, and runs the real stage commands through `dvc repro` with that copy's
code: the params check, paddy_data, then probe@<member> and train@<member> for each member, the ensemble, and the
check of submissions/submission.csv against sample_submission.csv (no upload: the data is synthetic). One member's
train run is killed with SIGKILL after its first completed epoch and run again, which must resume from it.

What is real: every member's architecture, item transform, batch transform size, the precision (fp32 on CPU whatever
is asked; on CUDA the profile's or `--precision`), full-size (480x640) JPEGs, the schedule and TTA.
What is cut: the data is generated, as few images as the stratified split allows (one validation image per class,
so validation.valid_pct is set to give that), weights are random (`pretrained: false`), and `epochs: 1` with each training epoch capped at STEPS_PER_EPOCH optimiser steps (fine_tune:
the frozen epoch and one unfrozen one). The batch size is the profile's on CUDA; on CPU the large members take a
few seconds an image, so the CPU default is CPU_BS, announced in the output and the JSON (`--bs` sets either), and
the probe measures only the candidate accums that leave at least 2 images per step at that bs.

Prints one line per member (stage times, the probe's accum, ok or the error), exits non-zero if any member failed
(after trying them all), and writes bench/rehearsal.json and each stage's log under bench/rehearsal-logs/.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import yaml

from pipeline import probe, train
from pipeline.common import log, read_json, write_json
from pipeline.paddy import CLASSES
from pipeline.params import PARAMS_FILE
from pipeline.profile import render_params
from pipeline.submission import SubmissionError
from pipeline.submit import SUBMISSION_FILE, check_submission
from pipeline.vision import precision_for, probe_decision_path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_FILE = Path("bench/rehearsal.json")
LOGS_DIR = Path("bench/rehearsal-logs")
PROFILE = "competition"
STAGE = "rehearsal"  # the prefix of its log lines, as the stages have theirs
IMAGE_SIZE = [480, 640]  # (w, h) as data.synthetic.image_size takes it: the real photos' portrait 480x640
STEPS_PER_EPOCH = 2  # full batches of bs per training epoch, at least
CPU_BS = 4  # 28 training images a member (the fewest the split allows) in 7 steps; the probe measures accum 1 and 2
MIN_IMAGES_PER_STEP = 2  # fastai's head has a BatchNorm1d, which cannot train on a batch of one image
MIN_SMALLEST_CLASS = 2  # the probe trains on the smallest class and needs at least 2 of its images
ERROR_CHARS = 300
GIB = 1024**3
KILL_POLL_S = 0.2
LEFTOVER_TIMEOUT_S = 60
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "rehearsal",
    "GIT_AUTHOR_EMAIL": "rehearsal@localhost",
    "GIT_COMMITTER_NAME": "rehearsal",
    "GIT_COMMITTER_EMAIL": "rehearsal@localhost",
}
# A line a Python process prints last when it dies of an exception (traceback or SystemExit of a stage's own error).
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b(:.*)?$")
STAGE_REFUSAL_LINE = re.compile(r"^(params|paddy_data|probe|train|ensemble): \S")
DVC_FAILURE_LINE = re.compile(r"^ERROR: (.*)$")


class RehearsalError(RuntimeError):
    """The rehearsal itself cannot start (bad option, no git): one line saying what to fix."""


# -- the rehearsal's params: pure functions ------------------------------------------------------------------------


def probe_accums_for(accums: Sequence[int], bs: int) -> list[int]:
    """The probe's candidate accums that leave at least 2 images per step at `bs` (all of them at the profile's bs).

    fastai's head has a BatchNorm1d, which refuses to train on a batch of one image; the probe measures every
    candidate accum at `bs // accum` images per step.
    """
    usable = [accum for accum in accums if bs // accum >= MIN_IMAGES_PER_STEP]
    if not usable:
        raise RehearsalError(f"--bs {bs} leaves fewer than {MIN_IMAGES_PER_STEP} images per step at every accum of "
                             f"probe.accums {list(accums)}; use --bs {MIN_IMAGES_PER_STEP * min(accums)} or more")
    return usable


def generated_split(bs: int, n_classes: int = len(CLASSES)) -> tuple[int, float]:
    """(data.synthetic.train_per_class, validation.valid_pct): the fewest generated images for a rehearsal at `bs`.

    Images cost seconds each on a CPU, a validation image (two validations and TTA's five passes) more than a
    training one, so the split keeps one validation image per class, the fewest a stratified split allows, and the
    training side gets STEPS_PER_EPOCH full batches of `bs`. The generator writes `train_per_class` images of each
    class and half that of the smallest, of which the probe needs 2.
    """
    per_class = 2 * MIN_SMALLEST_CLASS
    while True:
        total = (n_classes - 1) * per_class + per_class // 2
        if total - n_classes >= max(STEPS_PER_EPOCH * bs, n_classes):
            # scikit-learn's train_test_split rounds the test share up: half an image below n_classes gives n_classes.
            return per_class, round((n_classes - 0.5) / total, 4)
        per_class += 1


def rehearsal_params(profile: Mapping[str, Any], members: Sequence[str], bs: int, precision: str | None) -> dict:
    """The profile's params with the rehearsal's overrides: generated full-size data and its split sized from
    `bs`, only `members` (in the profile's order), random init, one epoch, `bs`, the probe's accums usable at `bs`,
    and `precision` when given.

    Everything else (architectures, item and batch transforms, the schedule, TTA) is the profile's.
    """
    params = copy.deepcopy(dict(profile))
    train_section = params["train"]
    train_per_class, valid_pct = generated_split(bs)
    params["data"]["source"] = "synthetic"
    params["data"]["synthetic"] = {"train_per_class": train_per_class, "n_test": bs, "image_size": list(IMAGE_SIZE)}
    params["validation"]["valid_pct"] = valid_pct
    params["probe"]["accums"] = probe_accums_for(params["probe"]["accums"], bs)
    train_section["bs"] = bs
    if precision is not None:
        train_section["precision"] = precision
    capped = {"pretrained": False, "epochs": 1, "max_steps_per_epoch": STEPS_PER_EPOCH}
    train_section["member_defaults"] = {**train_section.get("member_defaults", {}), **capped}
    train_section["members"] = {  # a member's own key wins over member_defaults: capped there too
        name: {**member, **{key: value for key, value in capped.items() if key in member}}
        for name, member in train_section["members"].items()
        if name in members
    }
    weights = params["ensemble"].get("weights") or {}
    params["ensemble"]["weights"] = {name: weight for name, weight in weights.items() if name in members}
    return params


# -- reading the stages' output: pure functions --------------------------------------------------------------------


def error_line(lines: Sequence[str], returncode: int) -> str:
    """One line saying why a stage failed: its exception or refusal, else DVC's error, else the exit code.

    A process killed by the kernel (out of memory) prints nothing of its own: then DVC's line, which names the exit
    code, is the truest.
    """
    stripped = [line.strip() for line in lines]
    own = [line for line in stripped if EXCEPTION_LINE.match(line) or STAGE_REFUSAL_LINE.match(line)]
    dvc = [match.group(1) for line in stripped if (match := DVC_FAILURE_LINE.match(line))]
    reason = own[-1] if own else dvc[-1] if dvc else f"exited with code {returncode}"
    reason = " ".join(reason.split())
    return reason if len(reason) <= ERROR_CHARS else reason[: ERROR_CHARS - 3] + "..."


@dataclass
class MemberRun:
    """One member's rehearsal: what is printed on its line and written to bench/rehearsal.json."""

    name: str
    probe_seconds: float | None = None
    train_seconds: float | None = None  # the killed run's and the rerun's together
    probe_cpu_seconds: float | None = None
    train_cpu_seconds: float | None = None
    accum: int | None = None
    accum_source: str | None = None
    error: str | None = None
    killed_after_epoch: int | None = None
    resumed_from_epoch: int | None = None
    images_per_second: float | None = None
    precision: str | None = None
    memory: dict | None = None  # the probe's predicted peak next to the one measured while training

    @property
    def ok(self) -> bool:
        return self.error is None


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def summary_line(run: MemberRun, name_width: int = 0) -> str:
    """The member's one line: probe and train times, the probe's accum, then `ok` or `error: <one line>`."""
    parts = [
        run.name.ljust(name_width),
        f"probe {_seconds(run.probe_seconds):>8}",
        f"train {_seconds(run.train_seconds):>8}",
        f"accum {'-' if run.accum is None else run.accum}",
    ]
    if run.images_per_second is not None:
        parts.append(f"{run.images_per_second:.1f} img/s")
    if run.memory and run.memory.get("ratio") is not None:
        parts.append(f"peak {run.memory['probe_gib']:.2f} GiB probe / {run.memory['train_gib']:.2f} train")
    if run.killed_after_epoch is not None:
        parts.append(f"killed after epoch {run.killed_after_epoch}, resumed from {run.resumed_from_epoch}")
    parts.append("ok" if run.ok else f"error: {run.error}")
    return "  ".join(parts)


def memory_comparison(probe_metrics: Mapping[str, Any], train_metrics: Mapping[str, Any], accum: int,
                      train_peak_rss_gib: float | None) -> dict | None:
    """The probe's peak at the accum train used next to train's: CUDA reserved (train's metrics, when they have it)
    on a GPU; on CPU peak RSS (the probe's fit in a child process; the train stage's process tree, TTA included)."""
    predicted = probe_metrics.get("peaks", {}).get(str(accum), {})
    if train_metrics.get("peak_reserved_gib") is not None:
        kind, probe_gib, train_gib = "cuda peak reserved", predicted.get("peak_reserved_gib"), train_metrics["peak_reserved_gib"]
    elif str(train_metrics.get("device", "")).startswith("cuda"):
        return None  # train's metrics do not record CUDA's peak: nothing to compare with
    else:
        kind, probe_gib, train_gib = "peak RSS", predicted.get("peak_gib"), train_peak_rss_gib
    if probe_gib is None or train_gib is None:
        return None
    return {"kind": kind, "probe_gib": round(probe_gib, 3), "train_gib": round(train_gib, 3),
            "ratio": round(train_gib / probe_gib, 3)}


# -- the workspace ---------------------------------------------------------------------------------------------------


def repo_files(repo: Path) -> list[str]:
    """The repository's tracked and untracked-not-ignored files (never data/, models/, .venv or the DVC cache)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, check=True,
                                capture_output=True, text=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        raise RehearsalError(f"{repo}: `git ls-files` failed; run the rehearsal from a git checkout") from None
    return [path for path in listed.split("\0") if path]


def copy_repo(repo: Path, workdir: Path) -> int:
    """Copy repo_files into workdir (a tracked file deleted from the checkout is skipped); returns how many."""
    copied = 0
    for relative in repo_files(repo):
        source = repo / relative
        if source.is_file():
            (workdir / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, workdir / relative)
            copied += 1
    return copied


def make_workspace(repo: Path, workdir: Path, params: Mapping[str, Any]) -> None:
    """A git + DVC repository in workdir: the copy, the rehearsal's params.yaml, one commit."""
    copy_repo(repo, workdir)
    header = f"# The rehearsal's params: the {PROFILE} profile with benchmarks/rehearsal.py's overrides.\n"
    (workdir / PARAMS_FILE).write_text(header + yaml.safe_dump(dict(params), sort_keys=False))
    git_env = {**os.environ, **GIT_IDENTITY}
    commands = [
        (["git", "init", "-q"], git_env),
        (["git", "add", "-A"], git_env),
        (["git", "commit", "-q", "-m", "rehearsal"], git_env),
        # Hard links: the large members' weights are not copied a second time into the workspace's DVC cache.
        ([sys.executable, "-m", "dvc", "config", "--local", "cache.type", "hardlink,copy"], stage_env(workdir)),
    ]
    for command, env in commands:
        try:
            subprocess.run(command, cwd=workdir, env=env, check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as err:
            reason = (err.stderr.strip().splitlines() or ["no output"])[-1]
            raise RehearsalError(f"{workdir}: `{' '.join(command[-3:])}` failed ({reason})") from None


def stage_env(workdir: Path) -> dict:
    """The stages import the workspace's code and run with this interpreter (dvc.yaml says `python -m ...`)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PYTHONPATH": str(workdir), "PATH": path, "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1"}


# -- running a stage ---------------------------------------------------------------------------------------------


@dataclass
class StageRun:
    returncode: int
    seconds: float
    lines: list[str]
    peak_rss_gib: float  # of the stage's process tree (dvc and the stage's own process)
    cpu_seconds: float  # user + system time of that tree: on a busy machine, what an idle one would need
    killed: bool = False

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.killed


def run_stage(workdir: Path, stage: str, log_file: Path, kill_when: Callable[[], bool] | None = None) -> StageRun:
    """`dvc repro --single-item <stage>` in workdir, its output into log_file; SIGKILL to it once `kill_when()`.

    The stage runs in a session of its own, so that the kill reaches DVC and the stage's process (and its workers)
    and nothing else; the same happens if the rehearsal itself is interrupted.
    """
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage]
    started, cpu_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    lines: list[str] = []
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        process = subprocess.Popen(command, cwd=workdir, env=stage_env(workdir), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        reader = threading.Thread(target=_collect, args=(process.stdout, lines, log), daemon=True)
        reader.start()
        killed = False
        try:
            while True:
                # wait4, not Popen.wait: its rusage holds the peak RSS of the process and of its waited-for children.
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    break
                if kill_when is not None and not killed and kill_when():
                    os.killpg(process.pid, signal.SIGKILL)
                    killed = True
                time.sleep(KILL_POLL_S)
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            raise
        process.returncode = os.waitstatus_to_exitcode(status)
        _reap_orphans()
        reader.join(timeout=LEFTOVER_TIMEOUT_S)  # a leftover process still holding the pipe must not hang us
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
    return StageRun(process.returncode, round(time.perf_counter() - started, 1), lines,
                    usage.ru_maxrss * 1024 / GIB, round(cpu_seconds, 1), killed)


def adopt_orphans() -> None:
    """Make this process the reaper of its descendants' orphans (Linux), so that their CPU time is counted.

    The probe measures in children of multiprocessing's forkserver, a process that outlives the probe by a moment:
    orphaned, it would be reaped by init and its CPU time lost to the stage's figures. Elsewhere a no-op.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _reap_orphans() -> None:
    """Wait (a bounded while) for the adopted orphans of a finished stage; this process starts no other children."""
    deadline = time.monotonic() + LEFTOVER_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # none left
        if not pid:
            time.sleep(KILL_POLL_S)


def _collect(stream, lines: list[str], log) -> None:
    for line in stream:
        lines.append(line.rstrip("\n"))
        log.write(line)
        log.flush()


def completed_epochs(workdir: Path, member: str) -> int:
    """Epochs the member's checkpoint holds (train writes state.json last, atomically, after each epoch)."""
    state_file = workdir / train.CHECKPOINTS_DIR / member / "state.json"
    try:
        return int(read_json(state_file).get("completed_epochs", 0))
    except (OSError, ValueError):
        return 0


# -- the rehearsal -----------------------------------------------------------------------------------------------


def run_logged(workdir: Path, stage: str, logs: Path, suffix: str = "", **kwargs) -> StageRun:
    log(STAGE, f"{stage}{suffix}: running")
    result = run_stage(workdir, stage, logs / f"{stage}{suffix}.log", **kwargs)
    outcome = "killed" if result.killed else "ok" if result.ok else f"failed: {error_line(result.lines, result.returncode)}"
    log(STAGE, f"{stage}{suffix}: {result.seconds} s ({result.cpu_seconds} s of CPU), {outcome}")
    return result


def rehearse_member(workdir: Path, name: str, logs: Path, kill: bool) -> MemberRun:
    """probe@name then train@name (killed after its first epoch and rerun when `kill`), and what they recorded."""
    run = MemberRun(name)
    probed = run_logged(workdir, f"probe@{name}", logs)
    run.probe_seconds, run.probe_cpu_seconds = probed.seconds, probed.cpu_seconds
    if not probed.ok:
        run.error = f"probe: {error_line(probed.lines, probed.returncode)}"
        return run
    decision = read_json(workdir / probe_decision_path(name))
    run.accum, run.accum_source = decision["accum"], decision["accum_source"]

    stage, train_seconds, train_cpu_seconds, peak_rss = f"train@{name}", 0.0, 0.0, 0.0
    if kill:
        killed = run_logged(workdir, stage, logs, ".killed", kill_when=lambda: completed_epochs(workdir, name) >= 1)
        train_seconds, train_cpu_seconds, peak_rss = killed.seconds, killed.cpu_seconds, killed.peak_rss_gib
        if not killed.killed:
            run.train_seconds, run.train_cpu_seconds = train_seconds, train_cpu_seconds
            run.error = ("train: " + error_line(killed.lines, killed.returncode) if not killed.ok
                         else "train: finished before its first checkpoint could be killed; the resume is unchecked")
            return run
        run.killed_after_epoch = completed_epochs(workdir, name)
    trained = run_logged(workdir, stage, logs)
    run.train_seconds = round(train_seconds + trained.seconds, 1)
    run.train_cpu_seconds = round(train_cpu_seconds + trained.cpu_seconds, 1)
    if not trained.ok:
        run.error = f"train: {error_line(trained.lines, trained.returncode)}"
        return run
    metrics = read_json(workdir / train.METRICS_DIR / f"{name}.json")
    run.resumed_from_epoch = metrics.get("resumed_from_epoch")
    run.images_per_second = metrics.get("images_per_second")
    run.precision = metrics.get("precision")
    run.accum = metrics.get("accum", run.accum)  # more than the probe's after an out-of-memory retry
    probe_metrics = read_json(workdir / probe.METRICS_DIR / f"{name}.json")
    run.memory = memory_comparison(probe_metrics, metrics, run.accum, max(peak_rss, trained.peak_rss_gib))
    if kill and not run.resumed_from_epoch:
        run.error = (f"train: killed after epoch {run.killed_after_epoch}, the rerun did not resume "
                     f"(metrics resumed_from_epoch {run.resumed_from_epoch})")
    return run


def check_outputs(workdir: Path) -> str | None:
    """The ensemble's submission validated against sample_submission.csv as `make submit` does; None when valid."""
    try:
        check_submission(workdir / SUBMISSION_FILE, workdir / "data/paddy")
    except SubmissionError as err:
        return str(err)
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rehearsal", description=__doc__.splitlines()[0])
    parser.add_argument("--members", help="comma-separated members of the competition profile (default: all)")
    parser.add_argument("--bs", type=int, help="train.bs (default: the profile's on CUDA, the smallest the probe "
                                                "can use on CPU)")
    parser.add_argument("--precision", choices=["fp16", "bf16", "fp32"],
                        help="train.precision on CUDA (default: the profile's); CPU trains in fp32 whatever is asked")
    parser.add_argument("--kill", metavar="MEMBER", help="the member whose train run is killed and resumed "
                                                          "(default: the first one rehearsed)")
    parser.add_argument("--workdir", type=Path, help="the scratch workspace (must not exist or be empty; "
                                                     "default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the workspace afterwards")
    args = parser.parse_args(argv)
    # A stage runs in a session of its own (see run_stage): a plain SIGTERM to the rehearsal would leave it running.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        ok = rehearse(args)
    except RehearsalError as err:
        raise SystemExit(f"rehearsal: {err}") from None
    if not ok:
        raise SystemExit(1)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def rehearse(args: argparse.Namespace) -> bool:
    """The whole rehearsal; True when every stage of every member passed."""
    profile = render_params(PROFILE)
    available = list(profile["train"]["members"])
    members = [name.strip() for name in args.members.split(",")] if args.members else available
    unknown = [name for name in members if name not in available]
    if unknown or not members:
        raise RehearsalError(f"unknown member {unknown[0] if unknown else '(none)'!r}; the {PROFILE} profile has: "
                             f"{', '.join(available)}")
    members = [name for name in available if name in members]
    kill_member = args.kill or members[0]
    if kill_member not in members:
        raise RehearsalError(f"--kill {kill_member!r} is not among the members rehearsed: {', '.join(members)}")
    cuda = torch.cuda.is_available()
    if args.bs is not None:
        bs, bs_source = args.bs, "--bs"
    elif cuda:
        bs, bs_source = profile["train"]["bs"], "the profile's"
    else:
        bs, bs_source = CPU_BS, f"reduced for the CPU from the profile's {profile['train']['bs']}; --bs to change"
    params = rehearsal_params(profile, members, bs, args.precision)
    precision = precision_for(params["train"]["precision"], cuda)
    device = f"cuda ({torch.cuda.get_device_name()})" if cuda else f"cpu ({os.cpu_count()} cores)"
    workdir = prepare_workdir(args.workdir)
    data = params["data"]["synthetic"]
    log(STAGE, f"{PROFILE} profile, {len(members)} member(s) on {device}: bs {bs} ({bs_source}), probe accums "
        f"{params['probe']['accums']}, precision {precision}{' (CPU: fp32 whatever is asked)' if not cuda else ''}; "
        f"generated {data['image_size'][0]}x{data['image_size'][1]} JPEGs ({data['train_per_class']} per class, "
        f"valid_pct {params['validation']['valid_pct']}: one validation image per class, {data['n_test']} test), "
        "random init, 1 epoch (fine_tune: frozen + 1 unfrozen)")
    log(STAGE, f"workspace {workdir} ({'kept' if args.keep else 'removed at the end; --keep keeps it'}); "
        f"logs in {LOGS_DIR}/")
    logs = REPO_ROOT / LOGS_DIR
    adopt_orphans()
    shutil.rmtree(logs, ignore_errors=True)
    started, load_before = time.perf_counter(), os.getloadavg()
    runs: list[MemberRun] = []
    stages: dict[str, Any] = {}
    try:
        make_workspace(REPO_ROOT, workdir, params)
        upstream_error = None
        for stage in ("params", "paddy_data"):
            result = run_logged(workdir, stage, logs)
            stages[stage] = {"seconds": result.seconds, "cpu_seconds": result.cpu_seconds, "ok": result.ok}
            if not result.ok:
                upstream_error = f"{stage}: {error_line(result.lines, result.returncode)}"
                break
        for name in members:
            runs.append(MemberRun(name, error=upstream_error) if upstream_error
                        else rehearse_member(workdir, name, logs, kill=name == kill_member))
        if all(run.ok for run in runs):
            result = run_logged(workdir, "ensemble", logs)
            stages["ensemble"] = {"seconds": result.seconds, "cpu_seconds": result.cpu_seconds, "ok": result.ok}
            submission_error = check_outputs(workdir) if result.ok else "ensemble: " + error_line(result.lines, result.returncode)
            stages["submission_check"] = {"ok": submission_error is None, "error": submission_error}
        else:
            stages["ensemble"] = {"skipped": "a member failed"}
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    total = round(time.perf_counter() - started, 1)
    ok = bool(runs) and all(run.ok for run in runs) and stages.get("submission_check", {}).get("ok", False)

    width = max(len(run.name) for run in runs) if runs else 0
    for run in runs:
        print(summary_line(run, width))
    print(ensemble_line(stages))
    print(f"rehearsal: {'ok' if ok else 'FAILED'} in {total:.0f} s ({total / 60:.1f} min), {device}, bs {bs}, "
          f"load average {load_before[0]:.1f} at the start -> {RESULT_FILE}")
    write_json(REPO_ROOT / RESULT_FILE, {
        "ok": ok,
        "profile": PROFILE,
        "device": device,
        "bs": bs,
        "bs_source": bs_source,
        "profile_bs": profile["train"]["bs"],
        "probe_accums": params["probe"]["accums"],
        "valid_pct": params["validation"]["valid_pct"],
        "precision": precision,
        "data": {"image_size_wh": data["image_size"], "train_per_class": data["train_per_class"],
                 "n_test": data["n_test"]},
        "stages": stages,
        "members": {run.name: asdict(run) | {"ok": run.ok} for run in runs},
        "killed_member": kill_member,
        "total_seconds": total,
        "load_average_start": load_before[0],
        "load_average_end": os.getloadavg()[0],
        "workspace": str(workdir) if args.keep else None,
    })
    return ok


def ensemble_line(stages: Mapping[str, Any]) -> str:
    ensemble = stages.get("ensemble")
    if ensemble is None:
        return "ensemble: not run (an upstream stage failed)"
    if "skipped" in ensemble:
        return f"ensemble: skipped ({ensemble['skipped']})"
    check = stages["submission_check"]
    verdict = "submission.csv valid against sample_submission.csv, not uploaded (synthetic data)" if check["ok"] \
        else f"error: {check['error']}"
    return f"ensemble: {ensemble['seconds']:.1f} s, {verdict}"


def prepare_workdir(workdir: Path | None) -> Path:
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix="paddy-rehearsal-"))
    workdir = workdir.resolve()
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise RehearsalError(f"--workdir {workdir}: exists and is not an empty folder; name a new one")
    if REPO_ROOT == workdir or REPO_ROOT in workdir.parents:
        raise RehearsalError(f"--workdir {workdir}: inside the repository; name a folder outside it")
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


if __name__ == "__main__":
    main()
