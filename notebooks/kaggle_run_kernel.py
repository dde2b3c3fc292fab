"""The script of the kernel that `make kaggle-run` pushes (pipeline/kaggle_run.py fills in SETTINGS).

In a Kaggle GPU session: unpack the code dataset into /kaggle/working/paddy-pipeline, resume from the previous run's
output if it is attached, install into Kaggle's own Python, switch the profile, run the stages, and leave the whole
project (dvc.lock, DVC's cache, models/checkpoints/, metrics...) as the kernel's output: the next `make kaggle-run`
attaches it as a source and resumes from it. The steps are notebooks/kaggle.sh's, as in notebooks/kaggle.ipynb.
"""

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

SETTINGS = {}  # name, archive, profile, targets, jobs, hours, install: written by pipeline/kaggle_run.py
INPUT = Path("/kaggle/input")
PROJECT = Path("/kaggle/working/paddy-pipeline")
MARKER = "kaggle-run.json"  # what `make kaggle-run` reads first: did the run finish, and what is stale


def run(*command: str, **env: str) -> None:
    print(">>", " ".join(command), flush=True)
    subprocess.run(command, cwd=PROJECT, check=True, env={**os.environ, **env})


def found(source: str, name: str) -> Path | None:
    """`name` in the attached source's folder: /kaggle/input/<slug>/, or in newer sessions
    /kaggle/input/{datasets,notebooks}/<owner>/<slug>/."""
    return next((path for depth in ("", "*/*/") for path in sorted(INPUT.glob(f"{depth}{source}/{name}"))), None)


def unpack_code() -> None:
    archive = found(f"{SETTINGS['name']}-code", SETTINGS["archive"])
    unpacked = found(f"{SETTINGS['name']}-code", "dvc.yaml")  # Kaggle may unpack an archive it is given
    if archive is None and unpacked is None:
        raise SystemExit(f"kaggle-run: the code dataset {SETTINGS['name']}-code is not attached under {INPUT}")
    if archive is None or archive.is_dir():
        shutil.copytree(archive or unpacked.parent, PROJECT, symlinks=True, dirs_exist_ok=True)
    else:
        with tarfile.open(archive) as tar:
            tar.extractall(PROJECT, filter="data")
    # DVC needs a git repository (dvc.yaml's outputs are git-ignored through it); the archive has no history.
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "kaggle-run"]):
        run(*command, GIT_AUTHOR_NAME="kaggle-run", GIT_AUTHOR_EMAIL="kaggle-run@localhost",
            GIT_COMMITTER_NAME="kaggle-run", GIT_COMMITTER_EMAIL="kaggle-run@localhost")


def restore(previous: Path) -> None:
    """All the previous run left (DVC's cache, its outputs cached or not, models/checkpoints/), under which this run's
    code is then unpacked: DVC skips every stage whose code, params and inputs are unchanged, and train.py resumes an
    unfinished member from its last epoch (if its checkpoint still matches)."""
    print(f">> resuming from the previous run's output {previous}", flush=True)
    shutil.copytree(previous, PROJECT, symlinks=True, ignore=shutil.ignore_patterns(".git", MARKER))


def stale() -> list[str]:
    """The stages of the run that are not up to date (`dvc status`), the always-changed source check left out."""
    targets = SETTINGS["targets"]
    status = subprocess.run(["dvc", "status", "--json", *targets], cwd=PROJECT, capture_output=True, text=True)
    if status.returncode:
        return ["dvc status failed"]
    return sorted(stage for stage, changes in json.loads(status.stdout or "{}").items() if changes != ["always changed"])


def main() -> None:
    previous = found(SETTINGS["name"], f"paddy-pipeline/{MARKER}")
    if previous is not None:
        restore(previous.parent)
    unpack_code()
    if previous is not None:  # its lock, not the pushed one: it says what the previous run finished
        shutil.copy2(previous.parent / "dvc.lock", PROJECT / "dvc.lock")
    if SETTINGS["install"]:
        run("bash", "notebooks/kaggle.sh", "install")
    run("bash", "notebooks/kaggle.sh", "setup", PROFILE=SETTINGS["profile"])
    if previous is not None:
        run("bash", "notebooks/kaggle.sh", "resume", PREVIOUS=str(previous.parent))
    failed = None
    try:
        if SETTINGS["targets"]:
            run("timeout", "--kill-after=10m", f"{SETTINGS['hours']}h", "dvc", "repro", *SETTINGS["targets"])
        else:
            run("bash", "notebooks/kaggle.sh", "train", JOBS=str(SETTINGS["jobs"]), TRAIN_HOURS=str(SETTINGS["hours"]))
    except subprocess.CalledProcessError as err:
        if err.returncode not in (124, 137):  # timeout's: the hours are up, the output is the run so far
            failed = f"{' '.join(err.cmd)} exited with {err.returncode}"
    finally:
        # Links into /kaggle/input (data/paddy's images) would be saved as copies of the competition's images.
        for link in [path for path in (PROJECT / "data").rglob("*") if path.is_symlink()]:
            link.unlink()
        left = stale()
        (PROJECT / MARKER).write_text(json.dumps({"finished": not failed and not left, "stale": left, "failed": failed}))
    if failed:
        raise SystemExit(f"kaggle-run: {failed}")


if __name__ == "__main__":
    main()
