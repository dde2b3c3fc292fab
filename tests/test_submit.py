"""Spec of `make submit`: what it refuses, the message it sends, the log it keeps, and the Kaggle client call."""

import ast
import importlib.machinery
import inspect
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import requests

from pipeline import submit as submit_module
from pipeline.paddy import CLASSES, COMPETITION
from pipeline.submission import SubmissionError
from pipeline.submit import (
    REAL_TEST_COUNT,
    REAL_TRAIN_COUNT,
    SubmitRefused,
    kaggle_upload,
    read_log,
    submission_message,
    submit,
)


def write_project(root, source="kaggle", n_train=REAL_TRAIN_COUNT, n_test=REAL_TEST_COUNT):
    """A project tree with data/paddy (SOURCE.json + sample_submission.csv), a submission and ensemble metrics."""
    data_dir = root / "data" / "paddy"
    data_dir.mkdir(parents=True)
    (data_dir / "SOURCE.json").write_text(json.dumps({"source": source, "counts": {"train": n_train, "test": n_test}}))
    ids = [f"{200001 + row}.jpg" for row in range(n_test)]
    pd.DataFrame({"image_id": ids, "label": ""}).to_csv(data_dir / "sample_submission.csv", index=False)
    (root / "submissions").mkdir()
    labels = [CLASSES[row % len(CLASSES)] for row in range(n_test)]
    pd.DataFrame({"image_id": ids, "label": labels}).to_csv(root / "submissions" / "submission.csv", index=False)
    (root / "metrics").mkdir()
    (root / "metrics" / "ensemble.json").write_text(
        json.dumps({"profile": "competition", "ensemble": {"valid_accuracy": 0.98123}})
    )
    return root


class Uploads:
    """Stand-in for kaggle_upload: records each (file, message) it is given."""

    def __init__(self):
        self.calls = []

    def __call__(self, submission_file, message):
        self.calls.append((Path(submission_file), message))


def submit_in(root, uploads, status=None, force=False):
    return submit(
        force=force,
        submission_file=root / "submissions" / "submission.csv",
        data_dir=root / "data" / "paddy",
        log_file=root / "submissions" / "log.csv",
        metrics_file=root / "metrics" / "ensemble.json",
        status=lambda: status or {},
        revision=lambda: "abc1234",
        upload=uploads,
    )


@pytest.fixture
def project(tmp_path):
    return write_project(tmp_path)


def test_a_clean_real_project_is_uploaded_and_logged(project):
    uploads = Uploads()
    message = submit_in(project, uploads)
    assert uploads.calls == [(project / "submissions" / "submission.csv", message)]
    logged = read_log(project / "submissions" / "log.csv")
    assert logged[["message"]].to_dict("list") == {"message": [message]}
    assert len(logged["sha256"].iloc[0]) == 64


def test_the_message_carries_revision_accuracy_and_profile(project):
    message = submit_in(project, Uploads())
    assert "abc1234" in message and "0.9812" in message and "competition" in message


def test_the_message_says_when_there_was_no_validation_set():
    message = submission_message("abc1234-dirty", {"profile": "competition", "ensemble": {"valid_accuracy": None}})
    assert "abc1234-dirty" in message and "n/a" in message


def test_synthetic_data_is_refused(tmp_path):
    project = write_project(tmp_path, source="synthetic")
    uploads = Uploads()
    with pytest.raises(SubmitRefused, match="synthetic"):
        submit_in(project, uploads)
    assert uploads.calls == []


def test_a_local_copy_without_the_real_counts_is_refused(tmp_path):
    project = write_project(tmp_path, source="/mnt/paddy.zip", n_train=500, n_test=REAL_TEST_COUNT)
    with pytest.raises(SubmitRefused, match=r"500 train.*10407"):
        submit_in(project, Uploads())


def test_a_sample_submission_without_the_real_row_count_is_refused(tmp_path):
    project = write_project(tmp_path, source="kaggle", n_test=REAL_TEST_COUNT)
    sample_file = project / "data" / "paddy" / "sample_submission.csv"
    sample = pd.read_csv(sample_file)
    sample.head(100).to_csv(sample_file, index=False)
    with pytest.raises(SubmitRefused, match="sample_submission.csv 100 rows"):
        submit_in(project, Uploads())


def test_a_submission_that_fails_validation_is_refused(project):
    submission_file = project / "submissions" / "submission.csv"
    submission = pd.read_csv(submission_file)
    submission.loc[5, "label"] = "rust"
    submission.to_csv(submission_file, index=False)
    uploads = Uploads()
    with pytest.raises(SubmissionError, match=r"submission\.csv: label 'rust'"):
        submit_in(project, uploads)
    assert uploads.calls == []


def test_stale_outputs_are_refused(project):
    stale = {"train@convnext_squish": [{"changed deps": {"params.yaml": "modified"}}]}
    with pytest.raises(SubmitRefused, match=r"stale \(train@convnext_squish\).*dvc repro"):
        submit_in(project, Uploads(), status=stale)


def test_only_the_ensemble_and_its_upstream_must_be_up_to_date(tmp_path, monkeypatch):
    """A never-built MovieLens branch does not block the upload; a stale member (upstream of ensemble) does."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "member.txt").write_text("weights\n")
    (repo / "dvc.yaml").write_text(
        "stages:\n"
        "  train: {cmd: cp member.txt preds.txt, deps: [member.txt], outs: [preds.txt]}\n"
        "  ensemble: {cmd: cp preds.txt submission.txt, deps: [preds.txt], outs: [submission.txt]}\n"
        "  collab: {cmd: cp ratings.txt collab.txt, deps: [ratings.txt], outs: [collab.txt]}\n"
    )
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=repo, check=True)
    subprocess.run(["dvc", "repro", "-q", "ensemble"], cwd=repo, check=True)
    monkeypatch.chdir(repo)  # as `make submit` runs, from the project root
    assert submit_module.dvc_status() == {}
    (repo / "member.txt").write_text("retrained\n")
    assert list(submit_module.dvc_status()) == ["train"]


def test_a_stage_that_always_runs_is_not_stale(project):
    """paddy_source (always_changed) is in every `dvc status`; it alone does not block an upload."""
    uploads = Uploads()
    submit_in(project, uploads, status={"paddy_source": ["always changed"]})
    assert len(uploads.calls) == 1


def test_the_same_file_twice_is_refused(project):
    uploads = Uploads()
    submit_in(project, uploads)
    with pytest.raises(SubmitRefused, match="already uploaded.*--force"):
        submit_in(project, uploads)
    assert len(uploads.calls) == 1


def test_force_uploads_the_same_file_again_and_logs_it_again(project):
    uploads = Uploads()
    submit_in(project, uploads)
    submit_in(project, uploads, force=True)
    assert len(uploads.calls) == 2
    assert len(read_log(project / "submissions" / "log.csv")) == 2


def test_a_failed_upload_is_not_logged(project):
    def failing_upload(submission_file, message):
        raise SubmitRefused("kaggle: upload failed")

    with pytest.raises(SubmitRefused):
        submit_in(project, failing_upload)
    assert not (project / "submissions" / "log.csv").exists()


def test_main_turns_a_refusal_into_one_line_and_a_nonzero_exit(tmp_path, monkeypatch):
    write_project(tmp_path, source="synthetic")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        submit_module.main([])
    assert str(exit_info.value).startswith("submit: data/paddy/SOURCE.json: the data is synthetic")
    assert "\n" not in str(exit_info.value)


class FakeKaggleApi:
    """Stand-in for kaggle.api.kaggle_api_extended.KaggleApi that records what the pipeline calls."""

    COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE = "Could not submit to competition"
    calls: list = []
    authenticated = True
    response_message = "Successfully submitted"

    def authenticate(self):
        if not type(self).authenticated:
            print("KAGGLE_KEY=secret-should-not-leak")
            raise SystemExit(1)

    def competition_submit(self, *args, **kwargs):
        type(self).calls.append((args, kwargs))
        return types.SimpleNamespace(message=type(self).response_message)


@pytest.fixture
def fake_kaggle(monkeypatch):
    module = types.ModuleType("kaggle.api.kaggle_api_extended")
    api = type("KaggleApi", (FakeKaggleApi,), {"calls": []})
    module.KaggleApi = api
    # Stub the parent packages too: the real `kaggle/__init__.py` authenticates on import.
    for parent in ("kaggle", "kaggle.api"):
        package = types.ModuleType(parent)
        package.__path__ = []
        monkeypatch.setitem(sys.modules, parent, package)
    monkeypatch.setitem(sys.modules, "kaggle.api.kaggle_api_extended", module)
    return api


def real_competition_submit_signature() -> inspect.Signature:
    """KaggleApi.competition_submit's signature, read from the installed client's source without importing it
    (importing `kaggle` authenticates, which may reach the network)."""
    # PathFinder looks on disk, past the stand-in modules the fake_kaggle fixture put in sys.modules.
    package_dir = Path(importlib.machinery.PathFinder.find_spec("kaggle").submodule_search_locations[0])
    tree = ast.parse((package_dir / "api" / "kaggle_api_extended.py").read_text())
    api_class = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "KaggleApi")
    method = next(
        node for node in api_class.body if isinstance(node, ast.FunctionDef) and node.name == "competition_submit"
    )
    names = [arg.arg for arg in method.args.args]
    first_default = len(names) - len(method.args.defaults)
    return inspect.Signature(
        [
            inspect.Parameter(
                name,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=None if index >= first_default else inspect.Parameter.empty,
            )
            for index, name in enumerate(names)
        ]
    )


def test_upload_calls_the_official_client_with_file_message_and_competition(fake_kaggle, tmp_path):
    submission_file = tmp_path / "submission.csv"
    submission_file.write_text("image_id,label\n")
    kaggle_upload(submission_file, "paddy-pipeline abc1234")
    [(args, kwargs)] = fake_kaggle.calls
    bound = real_competition_submit_signature().bind("self", *args, **kwargs).arguments
    assert bound["file_name"] == str(submission_file)
    assert bound["message"] == "paddy-pipeline abc1234"
    assert bound["competition"] == COMPETITION == "paddy-disease-classification"


@pytest.mark.parametrize(
    "failure, refused",
    [(requests.ConnectionError("Connection refused"), True), (OSError(28, "No space left on device"), True),
     (TypeError("competition_submit() got an unexpected keyword argument"), False)],
)
def test_client_failures_are_one_line_and_a_bug_raises_as_itself(fake_kaggle, tmp_path, monkeypatch, failure, refused):
    def fails(self, *args, **kwargs):
        raise failure

    monkeypatch.setattr(fake_kaggle, "competition_submit", fails)
    with pytest.raises(SubmitRefused if refused else type(failure), match=None if refused else "unexpected") as caught:
        kaggle_upload(tmp_path / "submission.csv", "message")
    if refused:
        assert str(caught.value).startswith("kaggle: the ") and "\n" not in str(caught.value)


def test_missing_credentials_are_one_line_without_secrets(fake_kaggle, tmp_path, capsys):
    fake_kaggle.authenticated = False
    with pytest.raises(SubmitRefused) as refused:
        kaggle_upload(tmp_path / "submission.csv", "message")
    assert "credentials" in str(refused.value) and "\n" not in str(refused.value)
    captured = capsys.readouterr()
    assert "secret" not in captured.out + captured.err + str(refused.value)
    assert fake_kaggle.calls == []


class FakeKaggleServer:
    """The network under the real Kaggle client (requests' HTTPAdapter.send): Kaggle's API and its upload storage.

    The client asks the API for an upload URL, PUTs the file there, then creates the submission; `upload_status` is
    what the storage answers the PUT.
    """

    UPLOAD_URL = "https://storage.example/upload/paddy"

    def __init__(self, upload_status: int):
        self.upload_status = upload_status
        self.requests = []

    def send(self, request, **kwargs):
        self.requests.append((request.method, request.url))
        if request.url == self.UPLOAD_URL:
            return self._response(request, self.upload_status, {})
        if request.url.endswith("/StartSubmissionUpload"):
            return self._response(request, 200, {"token": "blob-token", "createUrl": self.UPLOAD_URL})
        if request.url.endswith("/CreateSubmission"):
            return self._response(request, 200, {"message": "Successfully submitted to Paddy Doctor"})
        return self._response(request, 404, {"code": 404, "message": f"no route {request.url}"})

    @staticmethod
    def _response(request, status: int, payload: dict) -> requests.Response:
        response = requests.Response()
        response.status_code, response.request, response.url = status, request, request.url
        response.headers["Content-Type"] = "application/json"
        response._content = json.dumps(payload).encode()
        return response


@pytest.fixture
def kaggle_server(tmp_path, monkeypatch):
    """The real client, with made-up legacy credentials (read offline), talking to a FakeKaggleServer."""
    for name in [name for name in os.environ if name.startswith("KAGGLE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle"))  # where the client looks for kaggle.json
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "made-up-key")

    def serve(upload_status: int) -> FakeKaggleServer:
        server = FakeKaggleServer(upload_status)
        monkeypatch.setattr(requests.adapters.HTTPAdapter, "send", server.send)
        return server

    return serve


def test_an_upload_the_client_reports_as_failed_is_an_error(kaggle_server, project):
    server = kaggle_server(upload_status=400)
    with pytest.raises(SubmitRefused) as refused:
        kaggle_upload(project / "submissions" / "submission.csv", "paddy-pipeline abc1234")
    # Imported only now: `import kaggle` authenticates (here with the made-up credentials, offline).
    from kaggle.api.kaggle_api_extended import KaggleApi

    assert str(refused.value).startswith(f"kaggle: {KaggleApi.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE}; nothing")
    assert ("PUT", server.UPLOAD_URL) in server.requests
    assert not any(url.endswith("/CreateSubmission") for _, url in server.requests)


def test_an_upload_the_client_completes_is_no_error(kaggle_server, project):
    server = kaggle_server(upload_status=200)
    kaggle_upload(project / "submissions" / "submission.csv", "paddy-pipeline abc1234")
    assert [url.rsplit("/", 1)[-1] for _, url in server.requests] == ["StartSubmissionUpload", "paddy", "CreateSubmission"]


# -- unreadable files under `make submit` ----------------------------------------------------------------------------

BINARY = bytes(range(256)) * 4


@pytest.mark.parametrize("content", [b"", BINARY, b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"\x00\x01\x02,\x05\n"])
def test_an_unreadable_submission_is_one_line_naming_it_and_the_fix(project, monkeypatch, content):
    (project / "submissions" / "submission.csv").write_bytes(content)
    monkeypatch.chdir(project)
    with pytest.raises(SystemExit) as stopped:
        submit_module.main([])
    message = str(stopped.value)
    assert message.startswith("submit: submissions/submission.csv: ")
    assert message.endswith("run `dvc repro ensemble` to write it again") and "\n" not in message


@pytest.mark.parametrize(
    "content", [b"", BINARY, b"time,sha256,message\n2024-01-01,abc,one,two\n", b"when,what\n2024-01-01,abc\n"]
)
def test_a_damaged_upload_log_is_one_line_naming_it_and_the_fix(project, content):
    (project / "submissions" / "log.csv").write_bytes(content)
    uploads = Uploads()
    with pytest.raises(SubmitRefused) as refused:
        submit_in(project, uploads)
    message = str(refused.value)
    assert message.startswith(f"{project / 'submissions' / 'log.csv'}: ")
    assert message.endswith("restore it from git, or move it aside to start a new one") and "\n" not in message
    assert uploads.calls == []
