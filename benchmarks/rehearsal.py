"""`make rehearsal`: the competition profile's DAG end to end, on generated full-size photos, in a scratch workspace.

What is real and what is cut: docs/benchmarks.md. The stages run by `dvc repro` in a copy of the tracked and
untracked-not-ignored files (never data/, models/, preds/ or the DVC cache) rather than by `dvc exp run --temp -S`:
a temporary experiment stores its outputs (six large members' weights) in the user's DVC cache, and is deleted when
its run is killed, so the resume after one member's SIGKILL could not be checked.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import signal
import subprocess
import sys
import tempfile
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
from pipeline.profile import LOCAL_FILE, render_params
from pipeline.submission import SubmissionError
from pipeline.submit import SUBMISSION_FILE, check_submission
from pipeline.vision import precision_for, probe_decision_path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_FILE, LOGS_DIR = Path("bench/rehearsal.json"), Path("bench/rehearsal-logs")
PROFILE, STAGE = "competition", "rehearsal"  # STAGE: the prefix of its log lines, as the stages have theirs
UPSTREAM = ("params", "paddy_source", "paddy_data", "small_images")  # the members' upstream stages, in DAG order
IMAGE_SIZE = [480, 640]  # (w, h) as data.synthetic.image_size takes it: the real photos' portrait 480x640
STEPS_PER_EPOCH = 2  # full batches of bs per training epoch, at least
CPU_BS = 4  # 28 training images a member (the fewest the split allows) in 7 steps; the probe measures accum 1 and 2
MIN_IMAGES_PER_STEP = 2  # fastai's head has a BatchNorm1d, which cannot train on a batch of one image
MIN_SMALLEST_CLASS = 2  # the probe trains on the smallest class and needs at least 2 of its images
ERROR_CHARS = 300
DVC_FAILURE = "ERROR: "


class RehearsalError(RuntimeError):
    """The rehearsal itself cannot start (bad option, no git): one line saying what to fix."""


def probe_accums_for(accums: Sequence[int], bs: int) -> list[int]:
    """The probe's candidate accums that leave at least MIN_IMAGES_PER_STEP images per step at `bs`."""
    usable = [accum for accum in accums if bs // accum >= MIN_IMAGES_PER_STEP]
    if not usable:
        raise RehearsalError(f"--bs {bs} leaves fewer than {MIN_IMAGES_PER_STEP} images per step at every accum of "
                             f"probe.accums {list(accums)}; use --bs {MIN_IMAGES_PER_STEP * min(accums)} or more")
    return usable


def generated_split(bs: int, n_classes: int = len(CLASSES)) -> tuple[int, float]:
    """(data.synthetic.train_per_class, validation.valid_pct): the fewest generated images for a rehearsal at `bs`.

    One validation image per class (the fewest a stratified split allows: validation and TTA cost the most), and
    STEPS_PER_EPOCH full batches of `bs` to train on. The generator writes `train_per_class` images of each class
    and half that of the smallest, of which the probe needs MIN_SMALLEST_CLASS.
    """
    per_class = 2 * MIN_SMALLEST_CLASS
    while True:
        total = (n_classes - 1) * per_class + per_class // 2
        if total - n_classes >= max(STEPS_PER_EPOCH * bs, n_classes):
            # scikit-learn's train_test_split rounds the test share up: half an image below n_classes gives n_classes.
            return per_class, round((n_classes - 0.5) / total, 4)
        per_class += 1


def rehearsal_params(profile: Mapping[str, Any], members: Sequence[str], bs: int, precision: str | None) -> dict:
    """The profile's params with the rehearsal's cuts (module docstring): only `members`, in the profile's order,
    their ensemble weights, `bs`, and `precision` when given; every other setting is the profile's."""
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


def error_line(lines: Sequence[str], returncode: int) -> str:
    """Why a stage failed, in one line: the last line the stage printed (a traceback's exception, or the stage's
    own one-line refusal) rather than its `[stage]` progress lines; else DVC's error (a process killed by the
    kernel prints nothing of its own); else the exit code."""
    stripped = [line.strip() for line in lines if line.strip()]
    own = [line for line in stripped if not line.startswith(("[", DVC_FAILURE))]
    dvc = [line[len(DVC_FAILURE):] for line in stripped if line.startswith(DVC_FAILURE)]
    reason = " ".join((own or dvc or [f"exited with code {returncode}"])[-1].split())
    return reason if len(reason) <= ERROR_CHARS else reason[: ERROR_CHARS - 3] + "..."


@dataclass
class MemberRun:
    """One member's rehearsal: what is printed on its line and written to bench/rehearsal.json."""

    name: str
    probe_seconds: float | None = None
    train_seconds: float | None = None  # the killed run's and the rerun's together
    accum: int | None = None
    error: str | None = None
    killed_after_epoch: int | None = None
    resumed_from_epoch: int | None = None
    images_per_second: float | None = None
    memory: dict | None = None  # on CUDA: the probe's peak next to the one measured while training

    @property
    def ok(self) -> bool:
        return self.error is None


def summary_line(run: MemberRun, name_width: int = 0) -> str:
    """The member's one line: probe and train times, the probe's accum, then `ok` or `error: <one line>`."""
    def shown(seconds):
        return f"{'-' if seconds is None else f'{seconds:.1f} s':>8}"
    parts = [run.name.ljust(name_width), f"probe {shown(run.probe_seconds)}", f"train {shown(run.train_seconds)}",
             f"accum {'-' if run.accum is None else run.accum}",
             run.images_per_second is not None and f"{run.images_per_second:.1f} img/s",
             run.memory and f"peak {run.memory['probe_gib']:.2f} GiB probe / {run.memory['train_gib']:.2f} train",
             run.killed_after_epoch is not None
             and f"killed after epoch {run.killed_after_epoch}, resumed from {run.resumed_from_epoch}",
             "ok" if run.ok else f"error: {run.error}"]
    return "  ".join(part for part in parts if part)


def memory_comparison(probe_metrics: Mapping[str, Any], train_metrics: Mapping[str, Any], accum: int) -> dict | None:
    """CUDA's peak reserved memory: the probe's at the accum train used, next to train's; None without both."""
    predicted = probe_metrics.get("peaks", {}).get(str(accum), {}).get("peak_reserved_gib")
    measured = train_metrics.get("peak_reserved_gib")
    if predicted is None or measured is None:
        return None
    return {"probe_gib": round(predicted, 3), "train_gib": round(measured, 3), "ratio": round(measured / predicted, 3)}


def copy_repo(repo: Path, workdir: Path) -> int:
    """Copy the repository's tracked and untracked-not-ignored files into workdir; returns how many."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, check=True,
                                capture_output=True, text=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError):
        raise RehearsalError(f"{repo}: `git ls-files` failed; run the rehearsal from a git checkout") from None
    files = [path for path in listed.split("\0") if path and (repo / path).is_file()]  # not a deleted tracked file
    for relative in files:
        (workdir / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / relative, workdir / relative)
    return len(files)


PARAMS_HEADER = f"# The rehearsal's params: the {PROFILE} profile with benchmarks/rehearsal.py's overrides.\n"


def make_workspace(repo: Path, workdir: Path, params: Mapping[str, Any], header: str = PARAMS_HEADER) -> None:
    """A git + DVC repository in workdir: the copy, `params` as its params.yaml under `header`, one commit."""
    copy_repo(repo, workdir)
    (workdir / PARAMS_FILE).write_text(header + yaml.safe_dump(dict(params), sort_keys=False))
    commit = ["git", "-c", "user.name=rehearsal", "-c", "user.email=rehearsal@localhost", "commit", "-qm", "rehearsal"]
    # Hard links: the large members' weights are not copied a second time into the workspace's DVC cache.
    for command in (["git", "init", "-q"], ["git", "add", "-A"], commit,
                    [sys.executable, "-m", "dvc", "config", "--local", "cache.type", "hardlink,copy"]):
        done = subprocess.run(command, cwd=workdir, env=stage_env(workdir), capture_output=True, text=True)
        if done.returncode:
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RehearsalError(f"{workdir}: `{' '.join(command[-3:])}` failed ({reason})")


def stage_env(workdir: Path) -> dict:
    """The stages import the workspace's code and run with this interpreter (dvc.yaml says `python -m ...`)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PYTHONPATH": str(workdir), "PATH": path, "PYTHONUNBUFFERED": "1", "DVC_NO_ANALYTICS": "1"}


@dataclass
class StageRun:
    seconds: float
    error: str | None  # None when it passed (or was killed as asked)
    killed: bool = False


def run_stage(workdir: Path, stage: str, log_file: Path, kill_when: Callable[[], bool] | None = None) -> StageRun:
    """`dvc repro --single-item <stage>` in workdir, its output into log_file; SIGKILL to it once `kill_when()`.

    The stage runs in a session of its own, so that the kill reaches DVC and the stage's process (and its workers)
    and nothing else; the same happens if the rehearsal itself is interrupted.
    """
    log(STAGE, f"{stage}: running, log in {log_file}")
    started, killed = time.perf_counter(), False
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as output:
        process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--single-item", stage], cwd=workdir,
                                   env=stage_env(workdir), stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            while process.poll() is None:
                if kill_when is not None and not killed and kill_when():
                    os.killpg(process.pid, signal.SIGKILL)
                    killed = True
                time.sleep(0.2)
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            raise
    seconds = round(time.perf_counter() - started, 1)
    error = None if killed or process.returncode == 0 else error_line(log_file.read_text().splitlines(),
                                                                      process.returncode)
    log(STAGE, f"{stage}: {seconds} s, {'killed' if killed else 'ok' if error is None else 'failed: ' + error}")
    return StageRun(seconds, error, killed)


def completed_epochs(workdir: Path, member: str) -> int:
    """Epochs the member's checkpoint holds (train writes state.json last, atomically, after each epoch)."""
    try:
        return int(read_json(workdir / train.CHECKPOINTS_DIR / member / "state.json").get("completed_epochs", 0))
    except (OSError, ValueError):
        return 0


def rehearse_member(workdir: Path, name: str, logs: Path, kill: bool) -> MemberRun:
    """probe@name then train@name (killed after its first epoch and rerun when `kill`), and what they recorded."""
    run = MemberRun(name)
    probed = run_stage(workdir, f"probe@{name}", logs / f"probe@{name}.log")
    run.probe_seconds = probed.seconds
    if probed.error:
        run.error = f"probe: {probed.error}"
        return run
    run.accum = read_json(workdir / probe_decision_path(name))["accum"]
    stage, run.train_seconds = f"train@{name}", 0.0
    if kill:
        killed = run_stage(workdir, stage, logs / f"{stage}.killed.log",
                           kill_when=lambda: completed_epochs(workdir, name) >= 1)
        run.train_seconds = killed.seconds
        if not killed.killed:
            run.error = f"train: {killed.error or 'finished before its first checkpoint could be killed'}"
            return run
        run.killed_after_epoch = completed_epochs(workdir, name)
    trained = run_stage(workdir, stage, logs / f"{stage}.log")
    run.train_seconds = round(run.train_seconds + trained.seconds, 1)
    if trained.error:
        run.error = f"train: {trained.error}"
        return run
    metrics = read_json(workdir / train.METRICS_DIR / f"{name}.json")
    run.resumed_from_epoch, run.images_per_second = metrics.get("resumed_from_epoch"), metrics.get("images_per_second")
    run.accum = metrics.get("accum", run.accum)  # more than the probe's after an out-of-memory retry
    run.memory = memory_comparison(read_json(workdir / probe.METRICS_DIR / f"{name}.json"), metrics, run.accum)
    if kill and not run.resumed_from_epoch:
        run.error = f"train: killed after epoch {run.killed_after_epoch}, the rerun did not resume"
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rehearsal", description=__doc__.splitlines()[0])
    parser.add_argument("--members", help="comma-separated members of the competition profile (default: all)")
    parser.add_argument("--bs", type=int, help=f"train.bs (default: the profile's on CUDA, {CPU_BS} on CPU)")
    parser.add_argument("--precision", choices=["fp16", "bf16", "fp32"],
                        help="train.precision on CUDA (default: the profile's); CPU trains in fp32 whatever is asked")
    parser.add_argument("--kill", metavar="MEMBER", help="the member whose train run is killed and resumed "
                                                          "(default: the first one rehearsed)")
    parser.add_argument("--workdir", type=Path, help="the scratch workspace (new or empty; default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the workspace afterwards")
    args = parser.parse_args(argv)
    # A stage runs in a session of its own (see run_stage): a plain SIGTERM to the rehearsal would leave it running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        ok = rehearse(args)
    except RehearsalError as err:
        raise SystemExit(f"rehearsal: {err}") from None
    raise SystemExit(0 if ok else 1)


def chosen_members(profile: Mapping[str, Any], members: str | None, kill: str | None) -> tuple[list[str], str]:
    """The members to rehearse, in the profile's order, and the one to kill."""
    available = list(profile["train"]["members"])
    asked = [name.strip() for name in members.split(",")] if members else available
    unknown = [name for name in asked if name not in available] or ([] if asked else ["(none)"])
    if unknown:
        raise RehearsalError(f"unknown member {unknown[0]!r}; the {PROFILE} profile has: {', '.join(available)}")
    chosen = [name for name in available if name in asked]
    if (kill or chosen[0]) not in chosen:
        raise RehearsalError(f"--kill {kill!r} is not among the members rehearsed: {', '.join(chosen)}")
    return chosen, kill or chosen[0]


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


def run_dag(workdir: Path, members: Sequence[str], kill_member: str, logs: Path) -> tuple[dict, list[MemberRun]]:
    """The members' upstream, each member, then the ensemble and its submission checked as `make submit` checks it.

    Returns each non-member stage's {seconds, error} and each member's run; the ensemble is skipped (absent) when
    a member failed, and every member fails with the upstream stage's error when one failed.
    """
    stages: dict[str, dict] = {}
    for stage in UPSTREAM:
        result = run_stage(workdir, stage, logs / f"{stage}.log")
        stages[stage] = {"seconds": result.seconds, "error": result.error}
        if result.error:
            return stages, [MemberRun(name, error=f"{stage}: {result.error}") for name in members]
    runs = [rehearse_member(workdir, name, logs, kill=name == kill_member) for name in members]
    if all(run.ok for run in runs):
        result = run_stage(workdir, "ensemble", logs / "ensemble.log")
        error = result.error and f"ensemble: {result.error}"
        if error is None:
            try:
                check_submission(workdir / SUBMISSION_FILE, workdir / "data/paddy")
            except SubmissionError as err:
                error = str(err)
        stages["ensemble"] = {"seconds": result.seconds, "error": error}
    return stages, runs


def rehearse(args: argparse.Namespace) -> bool:
    """The whole rehearsal; True when every stage of every member passed."""
    profile = render_params(PROFILE, REPO_ROOT / LOCAL_FILE)
    members, kill_member = chosen_members(profile, args.members, args.kill)
    cuda = torch.cuda.is_available()
    bs = args.bs or (profile["train"]["bs"] if cuda else CPU_BS)
    params = rehearsal_params(profile, members, bs, args.precision)
    precision = precision_for(params["train"]["precision"], cuda)
    device = f"cuda ({torch.cuda.get_device_name()})" if cuda else f"cpu ({os.cpu_count()} cores)"
    workdir = prepare_workdir(args.workdir)
    log(STAGE, f"{PROFILE} profile, {len(members)} member(s) on {device}: bs {bs}"
        f"{'' if cuda or args.bs else ' (reduced for the CPU; --bs to change)'}, probe accums "
        f"{params['probe']['accums']}, precision {precision}; generated 480x640 JPEGs, one validation image per "
        f"class; random init, 1 epoch; workspace {workdir} ({'kept' if args.keep else 'removed at the end'})")
    logs = REPO_ROOT / LOGS_DIR
    shutil.rmtree(logs, ignore_errors=True)
    started = time.perf_counter()
    try:
        make_workspace(REPO_ROOT, workdir, params)
        stages, runs = run_dag(workdir, members, kill_member, logs)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    total = round(time.perf_counter() - started, 1)
    ensemble = stages.get("ensemble")
    ok = ensemble is not None and ensemble["error"] is None  # there is an ensemble only when every member passed

    width = max(len(run.name) for run in runs)
    for run in runs:
        print(summary_line(run, width))
    print("ensemble: skipped (a member failed)" if ensemble is None else f"ensemble: {ensemble['seconds']:.1f} s, "
          + (f"error: {ensemble['error']}" if ensemble["error"] else "submission.csv valid, not uploaded (synthetic)"))
    print(f"rehearsal: {'ok' if ok else 'FAILED'} in {total:.0f} s ({total / 60:.1f} min), {device}, bs {bs}, "
          f"load average {os.getloadavg()[0]:.1f} -> {RESULT_FILE}")
    write_json(REPO_ROOT / RESULT_FILE, {
        "ok": ok, "profile": PROFILE, "device": device, "bs": bs, "profile_bs": profile["train"]["bs"],
        "probe_accums": params["probe"]["accums"], "precision": precision, "data": params["data"]["synthetic"],
        "stages": stages, "members": {run.name: asdict(run) | {"ok": run.ok} for run in runs},
        "killed_member": kill_member, "total_seconds": total, "workspace": str(workdir) if args.keep else None,
    })
    return ok


if __name__ == "__main__":
    main()
