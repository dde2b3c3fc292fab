"""`make submit`: upload submissions/submission.csv to the competition with the official Kaggle client (no stage).

What it refuses, and what it records in submissions/log.csv: docs/stages.md#make-submit.
"""

from __future__ import annotations

import argparse
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pandas as pd
from dvc.exceptions import DvcException
from dvc.repo import Repo

from pipeline import kaggle_client
from pipeline.common import atomic_path, file_sha256, log, read_csv, read_json, stage_main
from pipeline.paddy import CLASSES, COMPETITION, DATA_DIR, sample_submission_csv, source_json
from pipeline.submission import SubmissionError, read_sample_submission, read_submission, validate_submission

STAGE = "submit"
SUBMISSION_FILE = Path("submissions/submission.csv")
LOG_FILE = Path("submissions/log.csv")
METRICS_FILE = Path("metrics/ensemble.json")
ENSEMBLE_STAGE = "ensemble"  # the stage that writes the submission
LOG_COLUMNS = ("time", "sha256", "message")
# The real competition's image counts: anything else is not what Kaggle scores.
REAL_TRAIN_COUNT = 10_407
REAL_TEST_COUNT = 3_469


class SubmitRefused(RuntimeError):
    """A reason not to upload: the message is one line saying what is wrong and how to fix it."""


def check_real_data(data_dir: Path = DATA_DIR) -> None:
    """Refuse synthetic data, and data whose counts are not the real competition's."""
    record_file = source_json(data_dir)
    if not record_file.is_file():
        raise SubmitRefused(f"{record_file}: not found; run `dvc repro` on the competition profile first")
    record = read_json(record_file)
    source = record.get("source")
    if source == "synthetic":
        raise SubmitRefused(f"{record_file}: the data is synthetic; Kaggle scores only the real test set "
                            "(run `make profile PROFILE=competition`, then `dvc repro`)")
    counts = record.get("counts", {})
    n_sample = len(read_sample_submission(sample_submission_csv(data_dir)))
    if (counts.get("train"), counts.get("test"), n_sample) != (REAL_TRAIN_COUNT, REAL_TEST_COUNT, REAL_TEST_COUNT):
        raise SubmitRefused(f"{record_file}: source {source!r} has {counts.get('train')} train / {counts.get('test')} "
                            f"test images and sample_submission.csv {n_sample} rows; the competition has "
                            f"{REAL_TRAIN_COUNT} / {REAL_TEST_COUNT}")


def check_submission(submission_file: Path, data_dir: Path = DATA_DIR) -> None:
    sample = read_sample_submission(sample_submission_csv(data_dir))
    validate_submission(read_submission(submission_file), sample, CLASSES, str(submission_file))


def dvc_status(repo_dir: Path = Path(".")) -> dict:
    """`dvc status ensemble --with-deps`: stage -> what changed; empty when everything matches dvc.lock."""
    try:
        with Repo(str(repo_dir)) as repo:
            return repo.status(targets=[ENSEMBLE_STAGE], with_deps=True)
    except DvcException as err:
        raise SubmitRefused(f"dvc status failed ({err}); run `dvc status` to see why") from None


def check_up_to_date(status: dict) -> None:
    # An always_changed stage (paddy_source) is in every status; what it checks is covered by paddy_data's entry.
    stale = ", ".join(sorted(stage for stage, changes in status.items() if changes != ["always changed"]))
    if stale:
        raise SubmitRefused(f"dvc.lock: outputs are stale ({stale}); run `dvc repro {ENSEMBLE_STAGE}` (then commit) "
                            "before submitting")


def read_log(log_file: Path = LOG_FILE) -> pd.DataFrame:
    """The upload history (empty when nothing was uploaded yet); a damaged one is a SubmitRefused naming the fix."""
    if not Path(log_file).is_file():
        return pd.DataFrame(columns=list(LOG_COLUMNS))
    fix = "it is the upload history: restore it from git, or move it aside to start a new one"
    history = read_csv(log_file, SubmitRefused, fix)
    if tuple(history.columns) != LOG_COLUMNS:
        raise SubmitRefused(f"{log_file}: columns are {list(history.columns)[:5]}, not {', '.join(LOG_COLUMNS)}; {fix}")
    return history


def check_not_submitted(sha256: str, log_file: Path, force: bool) -> None:
    previous = read_log(log_file)
    earlier = previous[previous["sha256"] == sha256]
    if len(earlier) and not force:
        raise SubmitRefused(f"{log_file}: this exact file was already uploaded at {earlier['time'].iloc[-1]}; "
                            "pass --force (make submit ARGS=--force) to upload it again")


def append_log(log_file: Path, time: str, sha256: str, message: str) -> None:
    """Add one row to the upload log, rewritten atomically: a crash never truncates the history."""
    rows = pd.concat([read_log(log_file), pd.DataFrame([[time, sha256, message]], columns=list(LOG_COLUMNS))])
    with atomic_path(log_file) as tmp:
        rows.to_csv(tmp, index=False)


def git_revision(repo_dir: Path = Path(".")) -> str:
    """Short HEAD hash, with `-dirty` when tracked files differ from it (no tag names: every tag excluded)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty", "--exclude=*"], cwd=repo_dir,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        raise SubmitRefused("git: cannot read the revision; submit from a git checkout with at least one commit") from None


def submission_message(revision: str, metrics: dict) -> str:
    """git revision + the ensemble's validation accuracy + profile: enough to find the run behind a score."""
    accuracy = metrics.get("ensemble", {}).get("valid_accuracy")
    shown = "n/a (trained on all data)" if accuracy is None else f"{accuracy:.4f}"
    return f"paddy-pipeline {revision}: ensemble valid_accuracy {shown}, profile {metrics.get('profile')}"


def kaggle_upload(submission_file: Path, message: str, competition: str = COMPETITION) -> None:
    """Upload with the official client; missing or wrong credentials are a one-line SubmitRefused."""
    try:
        api = kaggle_client.authenticated_api()
        response = api.competition_submit(str(submission_file), message, competition)
    except kaggle_client.KaggleError as err:
        raise SubmitRefused(f"kaggle: {err}") from None
    except kaggle_client.CLIENT_ERRORS as err:
        raise SubmitRefused(f"kaggle: {kaggle_client.failure_message(err, competition, 'upload')}") from None
    if getattr(response, "message", None) == type(api).COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE:
        raise SubmitRefused(f"kaggle: {response.message}; nothing was recorded in {LOG_FILE}, try again")


def submit(force: bool = False, submission_file: Path = SUBMISSION_FILE, data_dir: Path = DATA_DIR,
           log_file: Path = LOG_FILE, metrics_file: Path = METRICS_FILE, status: Callable[[], dict] = dvc_status,
           revision: Callable[[], str] = git_revision, upload: Callable[[Path, str], None] = kaggle_upload) -> str:
    """Run every check, upload, and log the upload; returns the message sent with it."""
    check_real_data(data_dir)
    check_submission(submission_file, data_dir)
    check_up_to_date(status())
    sha256 = file_sha256(submission_file)
    check_not_submitted(sha256, log_file, force)
    if not Path(metrics_file).is_file():
        raise SubmitRefused(f"{metrics_file}: not found; run `dvc repro ensemble`")
    message = submission_message(revision(), read_json(metrics_file))
    upload(submission_file, message)
    append_log(log_file, datetime.now(timezone.utc).isoformat(timespec="seconds"), sha256, message)
    return message


@stage_main(STAGE, SubmitRefused, SubmissionError)
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="upload even if this exact file was uploaded before")
    args = parser.parse_args(argv)
    message = submit(force=args.force)
    log(STAGE, f"uploaded {SUBMISSION_FILE} to {COMPETITION}: {message!r} (logged in {LOG_FILE})")


if __name__ == "__main__":
    main()
