"""`make rehearsal`: the competition profile's DAG end to end, on generated full-size photos, in a scratch workspace.

What is real and what is cut, and why a scratch copy (benchmarks.make_workspace) rather than `dvc exp run --temp`:
docs/benchmarks.md. Options: `python -m benchmarks.rehearsal --help`.
"""

import copy
import itertools
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from benchmarks import PHOTO_SIZE, REPO_ROOT, WorkspaceError, cli, make_workspace, run_stage
from pipeline import probe, train
from pipeline.common import log, read_json, write_json
from pipeline.paddy import CLASSES
from pipeline.profile import LOCAL_FILE, render_params
from pipeline.submission import SubmissionError
from pipeline.submit import SUBMISSION_FILE, check_submission
from pipeline.vision import precision_for, probe_decision_path

RESULT_FILE, LOGS_DIR = Path("bench/rehearsal.json"), Path("bench/rehearsal-logs")
PROFILE, STAGE = "competition", "rehearsal"  # STAGE: the prefix of its log lines, as the stages have theirs
UPSTREAM = ("params", "paddy_source", "paddy_data", "small_images")  # the members' upstream stages, in DAG order
STEPS_PER_EPOCH = 2  # full batches of bs per training epoch, at least
CPU_BS = 4  # 28 training images a member (the fewest the split allows) in 7 steps; the probe measures accum 1 and 2
MIN_IMAGES_PER_STEP = 2  # fastai's head has a BatchNorm1d, which cannot train on a batch of one image
MIN_SMALLEST_CLASS = 2  # the probe trains on the smallest class and needs at least 2 of its images


def probe_accums_for(accums: Sequence[int], bs: int) -> list[int]:
    """The probe's candidate accums that leave at least MIN_IMAGES_PER_STEP images per step at `bs`."""
    if not (usable := [accum for accum in accums if bs // accum >= MIN_IMAGES_PER_STEP]):
        raise WorkspaceError(f"--bs {bs} leaves fewer than {MIN_IMAGES_PER_STEP} images per step at every accum of "
                             f"probe.accums {list(accums)}; use --bs {MIN_IMAGES_PER_STEP * min(accums)} or more")
    return usable


def generated_split(bs: int, n_classes: int = len(CLASSES)) -> tuple[int, float]:
    """(data.synthetic.train_per_class, validation.valid_pct): the fewest generated images giving one validation
    image per class (validation and TTA cost the most) and STEPS_PER_EPOCH full batches of `bs`; the generator writes
    half of `train_per_class` for the smallest class, of which the probe needs MIN_SMALLEST_CLASS."""
    total = lambda per_class: (n_classes - 1) * per_class + per_class // 2  # noqa: E731
    per_class = next(per_class for per_class in itertools.count(2 * MIN_SMALLEST_CLASS)
                     if total(per_class) - n_classes >= max(STEPS_PER_EPOCH * bs, n_classes))
    # scikit-learn's train_test_split rounds the test share up: half an image below n_classes gives n_classes.
    return per_class, round((n_classes - 0.5) / total(per_class), 4)


def rehearsal_params(profile: Mapping[str, Any], members: Sequence[str], bs: int) -> dict:
    """The profile's params with the rehearsal's cuts (docs/benchmarks.md): only `members` (an unknown one, or none,
    is a WorkspaceError) in the profile's order, their ensemble weights, `bs`; every other setting the profile's."""
    params, available = copy.deepcopy(dict(profile)), list(profile["train"]["members"])
    if unknown := [name for name in members if name not in available] or ([] if members else ["(none)"]):
        raise WorkspaceError(f"unknown member {unknown[0]!r}; the {PROFILE} profile has: {', '.join(available)}")
    train_per_class, params["validation"]["valid_pct"] = generated_split(bs)
    params["data"] |= {"source": "synthetic", "synthetic": {"train_per_class": train_per_class, "n_test": bs,
                                                            "image_size": list(PHOTO_SIZE)}}
    params["probe"]["accums"] = probe_accums_for(params["probe"]["accums"], bs)
    capped, section = {"pretrained": False, "epochs": 1, "max_steps_per_epoch": STEPS_PER_EPOCH}, params["train"]
    section |= {"bs": bs, "member_defaults": {**section.get("member_defaults", {}), **capped},
                "members": {  # a member's own key wins over member_defaults: capped there too
                    name: {**member, **{key: value for key, value in capped.items() if key in member}}
                    for name, member in section["members"].items() if name in members}}
    weights = params["ensemble"].get("weights") or {}
    params["ensemble"]["weights"] = {name: weight for name, weight in weights.items() if name in members}
    return params


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


def summary_line(run: MemberRun, name_width: int = 0) -> str:
    """The member's one line: probe and train times, the probe's accum, then `ok` or `error: <one line>`."""
    shown = lambda seconds: f"{'-' if seconds is None else f'{seconds:.1f} s':>8}"  # noqa: E731
    parts = [run.name.ljust(name_width), f"probe {shown(run.probe_seconds)}", f"train {shown(run.train_seconds)}",
             f"accum {'-' if run.accum is None else run.accum}",
             run.images_per_second is not None and f"{run.images_per_second:.1f} img/s",
             run.killed_after_epoch is not None
             and f"killed after epoch {run.killed_after_epoch}, resumed from {run.resumed_from_epoch}",
             run.memory and f"peak {run.memory['probe_gib']:.2f} GiB probe / {run.memory['train_gib']:.2f} train",
             "ok" if run.error is None else f"error: {run.error}"]
    return "  ".join(part for part in parts if part)


def memory_comparison(probe_metrics: Mapping[str, Any], train_metrics: Mapping[str, Any], accum: int) -> dict | None:
    """CUDA's peak reserved memory: the probe's at the accum train used, next to train's; None without both.
    The one check of the probe's prediction on the user's own GPU before the real run."""
    predicted = probe_metrics.get("peaks", {}).get(str(accum), {}).get("peak_reserved_gib")
    if predicted is None or (measured := train_metrics.get("peak_reserved_gib")) is None:
        return None
    return {"probe_gib": round(predicted, 3), "train_gib": round(measured, 3), "ratio": round(measured / predicted, 3)}


def completed_epochs(workdir: Path, member: str) -> int:
    """Epochs the member's checkpoint holds (train writes state.json last, atomically, after each epoch)."""
    state = workdir / train.CHECKPOINTS_DIR / member / "state.json"
    return int(read_json(state).get("completed_epochs", 0)) if state.is_file() else 0


def rehearse_member(workdir: Path, name: str, logs: Path, kill: bool) -> MemberRun:
    """probe@name then train@name (killed after its first epoch and rerun when `kill`), and what they recorded."""
    probed, stage = run_stage(workdir, f"probe@{name}", logs / f"probe@{name}.log"), f"train@{name}"
    run = MemberRun(name, probed.seconds, error=probed.error and f"probe: {probed.error}")
    if run.error:
        return run
    run.accum, run.train_seconds = read_json(workdir / probe_decision_path(name))["accum"], 0.0
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


def rehearse(members: list[str] | None, bs: int | None, keep: bool) -> bool:
    """The whole rehearsal; True when every stage of every member passed."""
    profile, cuda = render_params(PROFILE, REPO_ROOT / LOCAL_FILE), torch.cuda.is_available()
    params = rehearsal_params(profile, list(profile["train"]["members"]) if members is None else members,
                              bs or (profile["train"]["bs"] if cuda else CPU_BS))
    chosen, precision = list(params["train"]["members"]), precision_for(params["train"]["precision"], cuda)
    device = f"cuda ({torch.cuda.get_device_name()})" if cuda else f"cpu ({os.cpu_count()} cores)"
    workdir, logs, started = Path(tempfile.mkdtemp(prefix="paddy-rehearsal-")), REPO_ROOT / LOGS_DIR, time.perf_counter()
    log(STAGE, f"{len(chosen)} member(s) on {device}: bs {params['train']['bs']}"
        f"{'' if cuda or bs else ' (for the CPU; --bs)'}, probe accums {params['probe']['accums']}, {precision}; "
        f"workspace {workdir} ({'kept' if keep else 'removed'})")
    shutil.rmtree(logs, ignore_errors=True)
    try:  # the upstream stages, each member (the first killed and resumed), the ensemble when every member passed
        make_workspace(workdir, params, f"# The rehearsal's params: the {PROFILE} profile with its overrides.\n")
        stages = {}

        def timed(stage: str) -> str | None:  # the stage run into `stages`; its error's line, named, or None
            seconds, error, *_ = run_stage(workdir, stage, logs / f"{stage}.log")
            stages[stage] = {"seconds": seconds, "error": error}
            return error and f"{stage}: {error}"

        failed = next(filter(None, map(timed, UPSTREAM)), None)  # map is lazy: none runs after a failed one
        runs = [MemberRun(name, error=failed) if failed else
                rehearse_member(workdir, name, logs, kill=name == chosen[0]) for name in chosen]
        if not any(run.error for run in runs) and not timed("ensemble"):
            try:  # and its submission checked as `make submit` does
                check_submission(workdir / SUBMISSION_FILE, workdir / "data/paddy")
            except SubmissionError as err:
                stages["ensemble"]["error"] = str(err)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    total, ensemble = round(time.perf_counter() - started, 1), stages.get("ensemble")
    ok = ensemble is not None and ensemble["error"] is None  # there is an ensemble only when every member passed
    print("\n".join(summary_line(run, max(len(run.name) for run in runs)) for run in runs))
    print("ensemble: skipped (a member failed)" if ensemble is None else f"ensemble: {ensemble['seconds']:.1f} s, "
          + (f"error: {ensemble['error']}" if ensemble["error"] else "submission.csv valid, not uploaded (synthetic)"))
    print(f"rehearsal: {'ok' if ok else 'FAILED'} in {total / 60:.1f} min on {device} -> {RESULT_FILE}")
    write_json(REPO_ROOT / RESULT_FILE, {
        "ok": ok, "device": device, "params": {key: params[key] for key in ("data", "probe", "train")},
        "precision": precision, "stages": stages, "total_seconds": total, "workspace": str(workdir) if keep else None,
        "members": {run.name: asdict(run) | {"ok": run.error is None} for run in runs}})
    return ok


if __name__ == "__main__":
    # A stage runs in a session of its own (see run_stage): an interrupt (Ctrl-C, SIGTERM) reaches it through the
    # KeyboardInterrupt that cli's stage_main raises, which kills it and removes the workspace.
    cli(rehearse, ("--members", dict(type=lambda names: [name.strip() for name in names.split(",")],
                                     help="comma-separated members of the competition profile (default: all); the "
                                          "first one's training is killed after an epoch and resumed")),
        ("--bs", dict(type=int, help=f"train.bs (default: the profile's on CUDA, {CPU_BS} on CPU)")),
        ("--keep", dict(action="store_true", help="keep the scratch workspace afterwards, to inspect it")),
        show=lambda ok: sys.exit(0 if ok else 1))
