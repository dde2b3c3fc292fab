"""`make kaggle-run`: run the pipeline's stages in a private Kaggle GPU kernel and bring the outputs back into DVC.

Outputs are downloaded into .kaggle-run/<name>/ and swapped in only when complete: a run that fails, is cancelled or
leaves partial outputs changes nothing here (docs/kaggle.md#train-on-kaggles-gpus-make-kaggle-run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

from pipeline import kaggle_client
from pipeline.common import log, stage_main
from pipeline.paddy import COMPETITION
from pipeline.params import ParamsError, profile_of, read_params, section_of

STAGE = "kaggle-run"
WORK = Path(".kaggle-run")
KERNEL_SCRIPT = Path("notebooks/kaggle_run_kernel.py")
ARCHIVE = "paddy-pipeline-code.tar"
# The working tree's, not HEAD's: the params and lock as they are now, and the user's own overrides (untracked,
# docs/profiles.md). Appended after HEAD's files: of two members of a tar with one name, the later is extracted last.
RUN_FILES = ("params.yaml", "dvc.lock", "params.local.yaml")
MARKER = "kaggle-run.json"  # the kernel's account of its run (notebooks/kaggle_run_kernel.py)
OUTPUT_ROOT = "paddy-pipeline/"  # the project's folder in the kernel's output (/kaggle/working)
DONE, FAILED = {"COMPLETE"}, {"ERROR", "CANCEL_REQUESTED", "CANCEL_ACKNOWLEDGED"}


class KaggleRunError(RuntimeError):
    """What went wrong, in one line, with where its log is; nothing in the workspace was changed."""


@dataclasses.dataclass(frozen=True)
class RunConfig:
    name: str  # the kernel's slug; the code dataset is <name>-code
    targets: tuple[str, ...]  # dvc repro targets; empty: make train-parallel (every member, then the DAG)
    profile: str
    jobs: int
    hours: float  # training stops after this many hours, before Kaggle's 12-hour limit
    wait: bool
    collect: bool  # only follow and download the kernel pushed last
    poll_s: float
    wait_hours: float  # give up following (the kernel goes on) after this long

    @property
    def work(self) -> Path:
        return WORK / self.name


def code_archive(target: Path, repo: Path = Path(".")) -> Path:
    """HEAD's tracked files (git archive) plus the run's params and lock from the working tree."""
    git = subprocess.run(["git", "archive", "--format=tar", "-o", str(target.resolve()), "HEAD"], cwd=repo,
                         capture_output=True, text=True)
    if git.returncode:
        raise KaggleRunError(f"git archive HEAD failed ({git.stderr.strip()[:120]}); run from a git checkout")
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                            text=True).stdout
    left_out = sorted({line[3:] for line in status.splitlines()} - set(RUN_FILES))
    if left_out:
        log(STAGE, f"uncommitted changes are not in the run (it runs HEAD): {', '.join(left_out[:5])}")
    with tarfile.open(target, "a") as tar:
        for name in RUN_FILES:
            if (repo / name).is_file():
                tar.add(repo / name, arcname=name)
    return target


def kernel_script(cfg: RunConfig, install: bool = True) -> str:
    settings = {"name": cfg.name, "archive": ARCHIVE, "profile": cfg.profile, "targets": list(cfg.targets), "jobs": cfg.jobs,
                "hours": cfg.hours, "install": install}
    return KERNEL_SCRIPT.read_text().replace("SETTINGS = {}", f"SETTINGS = {settings!r}", 1)


def kernel_metadata(cfg: RunConfig, user: str, resume: bool) -> dict:
    return {
        "id": f"{user}/{cfg.name}", "title": cfg.name, "code_file": "script.py", "language": "python",
        "kernel_type": "script", "is_private": True, "enable_gpu": True,
        "machine_shape": "NvidiaTeslaT4",  # "GPU T4 x2"; enable_gpu alone gets the one P100
        "enable_internet": True,  # pip installs what Kaggle's Python lacks; timm fetches pretrained weights
        "dataset_sources": [f"{user}/{cfg.name}-code"], "competition_sources": [COMPETITION],
        # The previous version's output (the whole project: lock, DVC cache, checkpoints) is what a run resumes.
        "kernel_sources": [f"{user}/{cfg.name}"] if resume else [],
    }


def client_call(what: str, call, *args, **kwargs):
    """A call of the official client; its failures, and a response's `error` (Kaggle refusing an upload or push),
    become one secret-free KaggleRunError."""
    try:
        response = call(*args, **kwargs)
    except kaggle_client.CLIENT_ERRORS as err:
        raise KaggleRunError(f"kaggle: {kaggle_client.failure_message(err, COMPETITION, what)}") from None
    except ValueError as err:  # the client's own checks (metadata, a kernel it may not read)
        raise KaggleRunError(f"kaggle: the {what} failed: {err}") from None
    if getattr(response, "error", None):
        raise KaggleRunError(f"kaggle: Kaggle refused the {what}: {response.error}")
    return response


def empty_folder(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def upload_code(api, cfg: RunConfig, user: str) -> None:
    """The code goes as a private dataset version rather than inline in the kernel's source: a kernel's source is
    one text file (shown on its page, about 1 MB at most), a dataset takes the archive as it is, stays private and
    keeps every version; the kernel finds it mounted under /kaggle/input."""
    folder = empty_folder(cfg.work / "code")
    code_archive(folder / ARCHIVE)
    ref = f"{user}/{cfg.name}-code"
    meta = {"id": ref, "title": f"{cfg.name}-code", "licenses": [{"name": "other"}]}
    (folder / "dataset-metadata.json").write_text(json.dumps(meta))
    try:
        api.dataset_status(ref)
    except kaggle_client.CLIENT_ERRORS:  # no such dataset yet
        client_call("code upload", api.dataset_create_new, str(folder), public=False, quiet=True)
    else:
        client_call("code upload", api.dataset_create_version, str(folder), "make kaggle-run", quiet=True)
    # Kaggle processes a new version before a kernel can mount it.
    while (status := client_call("code upload", api.dataset_status, ref)) != "ready":
        if status == "failed":
            raise KaggleRunError(f"kaggle: Kaggle could not process the code dataset {ref}; see its page, push again")
        time.sleep(cfg.poll_s)


def push_kernel(api, cfg: RunConfig, user: str) -> None:
    kernel = f"{user}/{cfg.name}"
    try:
        api.kernels_status(kernel)
        resume = True
    except (*kaggle_client.CLIENT_ERRORS, ValueError):
        resume = False  # no earlier version
    folder = empty_folder(cfg.work / "kernel")
    (folder / "script.py").write_text(kernel_script(cfg))
    (folder / "kernel-metadata.json").write_text(json.dumps(kernel_metadata(cfg, user, resume)))
    response = client_call("kernel push", api.kernels_push, str(folder))
    log(STAGE, f"pushed {kernel} version {response.version_number}: {response.url} (cancel it there; "
               f"follow it again with make kaggle-run ARGS=--collect)")


def follow(api, cfg: RunConfig, kernel: str) -> tuple[str, str]:
    """Poll until the kernel ends, with one progress line; (status name, Kaggle's failure message)."""
    start = time.monotonic()
    while True:
        response = client_call("status check", api.kernels_status, kernel)
        status = getattr(response.status, "name", str(response.status))
        minutes = (time.monotonic() - start) / 60
        print(f"\r[{STAGE}] {kernel}: {status.lower()}, {minutes:.0f} min", end="", file=sys.stderr, flush=True)
        if status in DONE | FAILED:
            print(file=sys.stderr)
            return status, response.failure_message or ""
        if minutes > cfg.wait_hours * 60:
            print(file=sys.stderr)
            raise KaggleRunError(f"{kernel} is still {status.lower()} after {cfg.wait_hours} h; it goes on at Kaggle: "
                                 "collect it later with make kaggle-run ARGS=--collect; nothing here was changed")
        time.sleep(cfg.poll_s)


def download(api, kernel: str, scratch: Path, paths: list[str]) -> Path:
    """The kernel's output files under `paths` (and its log) into `scratch`; returns the log's path."""
    pattern = "^" + re.escape(OUTPUT_ROOT) + "(" + "|".join(re.escape(path) + "(/|$)" for path in paths) + ")"
    client_call("output download", api.kernels_output, kernel, str(scratch), file_pattern=pattern, force=True)
    return scratch / f"{kernel.split('/')[1]}.log"


def swap_in(project: Path, paths: list[str], replaced: Path) -> None:
    """Each path from the downloaded project replaces the workspace's (kept in `replaced`), one rename each."""
    shutil.rmtree(replaced, ignore_errors=True)
    for path in paths:
        if Path(path).exists():
            (replaced / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, replaced / path)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(project / path, path)


def collect(api, cfg: RunConfig, kernel: str) -> list[str]:
    """Download, check and swap in a finished kernel's outputs; returns the stages committed."""
    status, reason = follow(api, cfg, kernel)
    scratch = cfg.work / "download"
    shutil.rmtree(scratch, ignore_errors=True)
    log_file = download(api, kernel, scratch, ["params.yaml", "dvc.lock", MARKER])
    where = (f"its log: {log_file}" if log_file.is_file() else "it left no log") + "; nothing here was changed"
    if status in FAILED:
        raise KaggleRunError(f"{kernel} ended with status {status.lower()}: {reason or 'no reason given'}; {where}")
    project = scratch / OUTPUT_ROOT
    if not (project / MARKER).is_file() or not (project / "dvc.lock").is_file():
        raise KaggleRunError(f"{kernel} completed but left no outputs ({OUTPUT_ROOT}{MARKER}); {where}")
    marker = json.loads((project / MARKER).read_text())
    if not marker.get("finished"):
        raise KaggleRunError(f"{kernel} stopped before the end ({marker.get('failed') or 'time is up'}; stale: "
                             f"{', '.join(marker.get('stale', [])) or 'none'}); its checkpoints are in its output: "
                             f"make kaggle-run again resumes them; {where}")
    # The stages whose lock entry the kernel changed (what it ran or resumed there), and each of their outputs
    # (metrics and plots among them) with its file count if a folder (dvc.lock's nfiles).
    kernel_lock, pushed_lock = (yaml.safe_load(lock.read_text()).get("stages", {}) if lock.is_file() else {}
                                for lock in (project / "dvc.lock", cfg.work / "pushed.lock"))
    stages = [stage for stage, entry in kernel_lock.items() if pushed_lock.get(stage) != entry]
    outs = {out["path"]: out.get("nfiles") for stage in stages for out in kernel_lock[stage].get("outs", [])}
    if outs:
        download(api, kernel, scratch, list(outs))
    missing = [path for path, nfiles in outs.items() if not (project / path).exists()
               or (nfiles is not None and sum(1 for file in (project / path).rglob("*") if file.is_file()) != nfiles)]
    if missing:
        raise KaggleRunError(f"{kernel}'s output is partial: {', '.join(missing[:5])} missing or incomplete; {where}")
    swap_in(project, [*outs, "params.yaml"], cfg.work / "replaced")
    # The outputs into DVC's cache and their entries into dvc.lock, from this workspace's own hashes: the same code
    # (this commit), params (the kernel's params.yaml) and inputs (the outputs just swapped in) as the kernel's.
    if not stages:
        return stages
    commit = subprocess.run([sys.executable, "-m", "dvc", "commit", "--force", "--quiet", *stages], text=True,
                            capture_output=True)
    if commit.returncode:
        last = (commit.stderr.strip().splitlines() or ["no message"])[-1]
        raise KaggleRunError(f"dvc commit {' '.join(stages)} failed ({last}); the outputs are in place, what they "
                             f"replaced is in {cfg.work / 'replaced'}")
    return stages


def config(args: argparse.Namespace, params: dict) -> RunConfig:
    members = section_of(params, "train").get("members", {})
    unknown = [member for member in args.members or [] if member not in members]
    if unknown:
        raise ParamsError(f"params.yaml: train.members has no {', '.join(unknown)}; it has {', '.join(members)}")
    targets = (*args.stages, *(f"train@{member}" for member in args.members or []))
    profile = profile_of(params) if args.profile == "current" else args.profile
    return RunConfig(args.name, targets, profile, args.jobs, args.hours, args.wait, args.collect, args.poll,
                     args.wait_hours)


@stage_main(STAGE, KaggleRunError, kaggle_client.KaggleError, ParamsError)
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stages", nargs="*", help="dvc repro targets (default: make train-parallel, the whole DAG)")
    parser.add_argument("--members", type=lambda text: text.split(","), help="train only these members (a,b)")
    parser.add_argument("--name", default="paddy-pipeline-run", help="the kernel's name (its slug)")
    parser.add_argument("--profile", default="competition", help="the profile it runs, or `current`")
    parser.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True,
                        help="follow the kernel and bring its outputs back (--no-wait: push and return)")
    parser.add_argument("--collect", action="store_true", help="follow and collect the kernel pushed last")
    parser.add_argument("--jobs", type=int, default=2, help="members trained at once (one per T4)")
    parser.add_argument("--hours", type=float, default=11, help="stop training after this long (Kaggle: 12 h)")
    parser.add_argument("--poll", type=float, default=60, help="seconds between status checks")
    parser.add_argument("--wait-hours", type=float, default=13, help="stop following after this long")
    cfg = config(parser.parse_args(argv), read_params())
    api = kaggle_client.authenticated_api()
    user = api.get_config_value("username")
    kernel = f"{user}/{cfg.name}"
    if not cfg.collect:
        upload_code(api, cfg, user)  # makes cfg.work
        shutil.copy2("dvc.lock", cfg.work / "pushed.lock")  # what the kernel started from: tells what it ran
        push_kernel(api, cfg, user)
    if cfg.wait or cfg.collect:
        stages = collect(api, cfg, kernel)
        log(STAGE, f"{kernel}: {len(stages)} stages brought back and committed ({', '.join(stages) or 'none'}); "
                   "`dvc status` is clean for them")


if __name__ == "__main__":
    main()
