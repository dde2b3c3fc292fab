"""The paddy_data stage: every source, every integrity check, credentials without leaks, atomic swaps."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import requests
import yaml
from PIL import Image

from pipeline import paddy_data
from pipeline.paddy import CLASSES, COMPETITION, SMALLEST_CLASS
from pipeline.paddy_data import (
    NO_CREDENTIALS,
    DataConfig,
    DataError,
    SyntheticConfig,
    prepare_data,
    verify_dataset,
)

SECRET = "s3cr3t-kaggle-key-0123456789"
TINY = SyntheticConfig(train_per_class=8, n_test=20, image_size=(48, 64))


def _config(source: str, skip_bad_images: bool = False) -> DataConfig:
    return DataConfig(source=source, skip_bad_images=skip_bad_images, synthetic=TINY)


def _competition_zip(data_dir: Path, archive: Path, top: str = "") -> Path:
    """A stand-in for the competition download: the layout at the zip's root (or under `top`)."""
    with zipfile.ZipFile(archive, "w") as bundle:
        for path in sorted(data_dir.rglob("*")):
            if path.is_file() and path.name != "SOURCE.json":
                bundle.write(path, top + path.relative_to(data_dir).as_posix())
    return archive


def _copy(tiny_paddy: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_paddy, tmp_path / "copy"))


def _first_row(data_dir: Path) -> pd.Series:
    return pd.read_csv(data_dir / "train.csv").iloc[0]


def _one_line_error(data_dir: Path) -> str:
    with pytest.raises(DataError) as caught:
        verify_dataset(data_dir)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """A machine with no Kaggle credentials anywhere (a fake home, no KAGGLE_* variables)."""
    for name in list(paddy_data.os.environ):
        if name.startswith("KAGGLE_") or name == "XDG_CONFIG_HOME":
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


class FakeKaggleApi:
    """Stands in for kaggle's KaggleApi: records the calls and 'downloads' a local zip (or fails as told)."""

    calls: list = []
    archive: Path | None = None
    failure: Exception | None = None
    auth_exits = False

    def authenticate(self):
        FakeKaggleApi.calls.append(("authenticate",))
        if FakeKaggleApi.auth_exits:
            raise SystemExit(1)

    def competition_download_files(self, competition, path=None, force=False, quiet=True):
        FakeKaggleApi.calls.append(("competition_download_files", competition, path))
        if FakeKaggleApi.failure is not None:
            (Path(path) / f"{competition}.zip").write_bytes(b"PK\x03\x04 half a zip")
            raise FakeKaggleApi.failure
        shutil.copy(FakeKaggleApi.archive, Path(path) / f"{competition}.zip")


class FakeHTTPError(requests.HTTPError):
    """What the client's kagglesdk raises for an HTTP error status: requests' HTTPError, with the response."""

    def __init__(self, status: int):
        response = requests.Response()
        response.status_code = status
        super().__init__(f"{status} Client Error for url https://www.kaggle.com/api?key={SECRET}", response=response)


@pytest.fixture
def fake_kaggle(monkeypatch):
    """Install FakeKaggleApi where `from kaggle.api.kaggle_api_extended import KaggleApi` finds it (no network)."""
    extended = types.ModuleType("kaggle.api.kaggle_api_extended")
    extended.KaggleApi = FakeKaggleApi
    monkeypatch.setitem(sys.modules, "kaggle", types.ModuleType("kaggle"))
    monkeypatch.setitem(sys.modules, "kaggle.api", types.ModuleType("kaggle.api"))
    monkeypatch.setitem(sys.modules, "kaggle.api.kaggle_api_extended", extended)
    monkeypatch.setattr(FakeKaggleApi, "calls", [])
    monkeypatch.setattr(FakeKaggleApi, "failure", None)
    monkeypatch.setattr(FakeKaggleApi, "auth_exits", False)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    return FakeKaggleApi


# -- sources ---------------------------------------------------------------------------------------------------------


def test_synthetic_source_writes_the_layout_and_says_loudly_it_is_synthetic(tmp_path, capsys):
    record = prepare_data(_config("synthetic"), 0, tmp_path / "paddy", tmp_path / "downloads")
    assert "SYNTHETIC" in capsys.readouterr().err
    source = json.loads((tmp_path / "paddy" / "SOURCE.json").read_text())
    assert source == record
    assert source["source"] == "synthetic"
    assert source["counts"]["train"] == 9 * 8 + 4 and source["counts"]["test"] == 20
    assert source["smallest_class"] == {"label": SMALLEST_CLASS, "count": 4}


def test_same_seed_gives_byte_identical_source_json(tmp_path):
    prepare_data(_config("synthetic"), 5, tmp_path / "a", tmp_path / "downloads")
    prepare_data(_config("synthetic"), 5, tmp_path / "b", tmp_path / "downloads")
    assert (tmp_path / "a" / "SOURCE.json").read_bytes() == (tmp_path / "b" / "SOURCE.json").read_bytes()


def test_local_zip_source_is_extracted_verified_and_hashed(tiny_paddy, tmp_path):
    archive = _competition_zip(tiny_paddy, tmp_path / "paddy.zip")
    record = prepare_data(_config(str(archive)), 0, tmp_path / "paddy", tmp_path / "downloads")
    assert record["source"] == str(archive)
    assert record["archive_sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert (tmp_path / "paddy" / "train.csv").read_bytes() == (tiny_paddy / "train.csv").read_bytes()
    assert record["checksums"]["train.csv"] == hashlib.sha256((tiny_paddy / "train.csv").read_bytes()).hexdigest()


def test_zip_with_one_top_folder_is_accepted(tiny_paddy, tmp_path):
    archive = _competition_zip(tiny_paddy, tmp_path / "paddy.zip", top="paddy-disease-classification/")
    prepare_data(_config(str(archive)), 0, tmp_path / "paddy", tmp_path / "downloads")
    assert (tmp_path / "paddy" / "train.csv").is_file()


def test_local_folder_source_is_copied_not_moved(tiny_paddy, tmp_path):
    folder = _copy(tiny_paddy, tmp_path)
    record = prepare_data(_config(str(folder)), 0, tmp_path / "paddy", tmp_path / "downloads")
    assert record["source"] == str(folder)
    assert (folder / "train.csv").is_file()
    assert len(list((tmp_path / "paddy" / "test_images").iterdir())) == 20


def test_missing_local_source_names_the_path_and_the_choices(tmp_path):
    with pytest.raises(DataError, match="no such file or folder; use kaggle, synthetic"):
        prepare_data(_config(str(tmp_path / "nowhere.zip")), 0, tmp_path / "paddy", tmp_path / "downloads")


def test_kaggle_source_calls_the_official_client_and_caches_the_zip(tiny_paddy, tmp_path, fake_kaggle):
    fake_kaggle.archive = _competition_zip(tiny_paddy, tmp_path / "standin.zip")
    downloads = tmp_path / "downloads"
    record = prepare_data(_config("kaggle"), 0, tmp_path / "paddy", downloads)

    assert fake_kaggle.calls[0] == ("authenticate",)
    method, competition, path = fake_kaggle.calls[1]
    assert (method, competition) == ("competition_download_files", COMPETITION)
    assert Path(path).parent == downloads
    assert record["source"] == "kaggle" and record["competition"] == COMPETITION
    assert (downloads / f"{COMPETITION}.zip").read_bytes() == fake_kaggle.archive.read_bytes()
    assert (tmp_path / "paddy" / "train.csv").read_bytes() == (tiny_paddy / "train.csv").read_bytes()


def test_kaggle_rerun_uses_the_cached_zip_without_downloading(tiny_paddy, tmp_path, fake_kaggle):
    fake_kaggle.archive = _competition_zip(tiny_paddy, tmp_path / "standin.zip")
    prepare_data(_config("kaggle"), 0, tmp_path / "paddy", tmp_path / "downloads")
    fake_kaggle.calls.clear()
    prepare_data(_config("kaggle"), 0, tmp_path / "paddy", tmp_path / "downloads")
    assert fake_kaggle.calls == []


# -- credentials -----------------------------------------------------------------------------------------------------


def test_missing_credentials_is_one_line_on_how_to_add_them_and_leaks_no_secret(
    tmp_path, monkeypatch, capsys, no_credentials
):
    # A key without a username is not usable; its value must still appear nowhere.
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load(Path(__file__).parents[1].joinpath("params.yaml").read_text())
    params["data"]["source"] = "kaggle"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    with pytest.raises(SystemExit) as stopped:
        paddy_data.main()
    message = str(stopped.value.code)
    assert message == f"paddy_data: {NO_CREDENTIALS}"
    assert "~/.kaggle/access_token" in message and "KAGGLE_API_TOKEN" in message
    captured = capsys.readouterr()
    assert SECRET not in message + captured.out + captured.err
    assert not (tmp_path / "data" / "paddy").exists()


# Each placement of credentials, asked of the real client and of credentials_source in one fresh process. The
# client picks its kaggle.json folder when its module is imported, so the script re-imports it for every placement;
# only the two client methods that would call Kaggle (validating a token) are replaced, by ones that accept it.
CREDENTIALS_AGREE = """
import contextlib, importlib, io, json, os, sys, tempfile
from pathlib import Path

def clean_environment(home):
    for name in [name for name in os.environ if name.startswith("KAGGLE_") or name == "XDG_CONFIG_HOME"]:
        del os.environ[name]
    os.environ["HOME"] = str(home)

clean_environment(tempfile.mkdtemp())
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    extended = importlib.import_module("kaggle.api.kaggle_api_extended")  # authenticates: none here, offline
from kagglesdk import KaggleCredentials
from pipeline.kaggle_client import credentials_source

KaggleCredentials.get_access_token = lambda self: "token-from-refresh"
answers = []
for variables, files in json.loads(sys.argv[1]):
    home = Path(tempfile.mkdtemp())
    clean_environment(home)
    for name, content in files.items():
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        (home / name).write_text(content)
    os.environ.update({key: value.format(home=home) for key, value in variables.items()})
    ours = credentials_source()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        importlib.reload(extended)
        extended.KaggleApi._introspect_token = lambda self, token: "someone"
        api = extended.KaggleApi()
        try:
            api.authenticate()
            method = api.config_values[api.CONFIG_NAME_AUTH_METHOD]
        except SystemExit:
            method = None
    answers.append({"ours": ours, "client": method, "client_file": api.config})
print(json.dumps(answers))
"""
KAGGLE_JSON = json.dumps({"username": "someone", "key": SECRET})
OAUTH_JSON = json.dumps({"refresh_token": SECRET, "username": "someone"})
NOTEBOOK = {"KAGGLE_KERNEL_RUN_TYPE": "Interactive", "KAGGLE_DATA_PROXY_URL": "http://127.0.0.1:9"}
PLACEMENTS = [
    ({"KAGGLE_API_TOKEN": SECRET}, {}),
    ({"KAGGLE_USERNAME": "someone", "KAGGLE_KEY": SECRET}, {}),
    ({}, {".kaggle/access_token": SECRET}),
    ({}, {".kaggle/access_token.txt": SECRET}),
    ({}, {".kaggle/kaggle.json": KAGGLE_JSON}),
    ({}, {".config/kaggle/kaggle.json": KAGGLE_JSON}),
    ({"XDG_CONFIG_HOME": "{home}/xdg"}, {"xdg/kaggle/kaggle.json": KAGGLE_JSON}),
    ({"KAGGLE_CONFIG_DIR": "{home}/elsewhere"}, {"elsewhere/kaggle.json": KAGGLE_JSON}),
    ({}, {".kaggle/credentials.json": OAUTH_JSON}),
    ({**NOTEBOOK, "KAGGLE_API_V1_TOKEN": "{home}/notebook_token"}, {"notebook_token": SECRET}),
    ({"KAGGLE_API_V1_TOKEN": "{home}/notebook_token"}, {"notebook_token": SECRET}),  # outside a notebook
    ({}, {".kaggle/other.txt": "", ".config/kaggle/kaggle.json": KAGGLE_JSON}),  # ~/.kaggle exists: XDG unread
    ({"KAGGLE_KEY": SECRET}, {}),
    ({}, {}),
]


def test_credentials_are_found_where_the_kaggle_client_finds_them():
    script = subprocess.run(
        [sys.executable, "-c", CREDENTIALS_AGREE, json.dumps(PLACEMENTS)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert script.returncode == 0, script.stderr
    answers = json.loads(script.stdout)
    for (variables, files), answer in zip(PLACEMENTS, answers):
        placement = f"{sorted(variables)} {sorted(files)}"
        assert (answer["ours"] is None) == (answer["client"] is None), f"{placement}: {answer}"
        if answer["client"] is not None:
            assert SECRET not in answer["ours"]
        if answer["client"] == "LEGACY_API_KEY" and "KAGGLE_USERNAME" not in variables:
            assert answer["ours"] == answer["client_file"], placement
    assert [answer["client"] is None for answer in answers].count(True) >= 3  # the placements it must not accept


@pytest.mark.parametrize(
    "status, hint",
    [(401, "HTTP 401); create a new API token"), (403, f"competitions/{COMPETITION}/rules"), (404, "(HTTP 404)")],
)
def test_client_http_errors_become_one_line_without_secrets(tmp_path, fake_kaggle, status, hint):
    fake_kaggle.failure = FakeHTTPError(status)
    with pytest.raises(DataError) as caught:
        prepare_data(_config("kaggle"), 0, tmp_path / "paddy", tmp_path / "downloads")
    assert hint in str(caught.value)
    assert SECRET not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_a_network_failure_is_one_line_and_a_bug_raises_as_itself(tmp_path, fake_kaggle):
    fake_kaggle.failure = requests.ConnectionError(f"Max retries exceeded with url: /api?key={SECRET}")
    with pytest.raises(DataError, match=r"^the Kaggle API failed \(ConnectionError\); check the network") as caught:
        prepare_data(_config("kaggle"), 0, tmp_path / "paddy", tmp_path / "downloads")
    assert SECRET not in str(caught.value)
    fake_kaggle.failure = AttributeError("'NoneType' object has no attribute 'url'")
    with pytest.raises(AttributeError):
        prepare_data(_config("kaggle"), 0, tmp_path / "paddy", tmp_path / "downloads")


def test_credentials_the_client_cannot_use_are_a_clear_error(tmp_path, fake_kaggle):
    fake_kaggle.auth_exits = True
    with pytest.raises(DataError, match="could not use the credentials in the KAGGLE_USERNAME and KAGGLE_KEY"):
        prepare_data(_config("kaggle"), 0, tmp_path / "paddy", tmp_path / "downloads")


# -- integrity -------------------------------------------------------------------------------------------------------


def test_verified_data_passes_with_nothing_skipped(tiny_paddy):
    skipped, images_sha256 = verify_dataset(tiny_paddy)
    assert skipped == [] and len(images_sha256) == 64


def test_missing_column_names_the_file_and_the_columns(tiny_paddy, tmp_path):
    data_dir = _copy(tiny_paddy, tmp_path)
    pd.read_csv(data_dir / "train.csv").drop(columns="variety").to_csv(data_dir / "train.csv", index=False)
    assert "train.csv: missing column 'variety'" in _one_line_error(data_dir)


def test_row_whose_image_is_missing_names_the_image_and_the_fix(tiny_paddy, tmp_path):
    data_dir = _copy(tiny_paddy, tmp_path)
    row = _first_row(data_dir)
    (data_dir / "train_images" / row.label / row.image_id).unlink()
    message = _one_line_error(data_dir)
    assert f"train_images/{row.label}/{row.image_id}: listed in train.csv but missing" in message
    assert "restore the image" in message and "skip_bad_images" in message


def test_image_not_in_train_csv_is_an_error(tiny_paddy, tmp_path):
    data_dir = _copy(tiny_paddy, tmp_path)
    row = _first_row(data_dir)
    shutil.copy(data_dir / "train_images" / row.label / row.image_id, data_dir / "train_images" / "blast" / "999.jpg")
    assert "train_images/blast/999.jpg: is not listed in train.csv; add its row" in _one_line_error(data_dir)


def test_label_that_is_not_a_class_is_an_error(tiny_paddy, tmp_path):
    data_dir = _copy(tiny_paddy, tmp_path)
    train = pd.read_csv(data_dir / "train.csv")
    train.loc[0, "label"] = "leaf_rust"
    train.to_csv(data_dir / "train.csv", index=False)
    expected = f"train.csv line 2 ({train.image_id[0]}): label 'leaf_rust' is not one of the 10"
    assert expected in _one_line_error(data_dir)


def test_truncated_image_is_an_error_naming_it(tiny_paddy, tmp_path):
    data_dir = _copy(tiny_paddy, tmp_path)
    row = _first_row(data_dir)
    image = data_dir / "train_images" / row.label / row.image_id
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    message = _one_line_error(data_dir)
    assert f"train_images/{row.label}/{row.image_id}: not a readable image" in message
    assert "replace it from the competition zip" in message


@pytest.mark.parametrize("max_listed, shown", [(3, "(8 bad files, the first 3 listed above)"), (20, "(8 bad files, all listed above)")])
def test_a_missing_class_folder_lists_what_the_error_says_it_lists(tiny_paddy, tmp_path, monkeypatch, capsys, max_listed, shown):
    data_dir = _copy(tiny_paddy, tmp_path)
    shutil.rmtree(data_dir / "train_images" / "blast")
    monkeypatch.setattr(paddy_data, "MAX_LISTED", max_listed)
    assert _one_line_error(data_dir).endswith(shown)
    listed = [line for line in capsys.readouterr().err.splitlines() if "listed in train.csv but missing" in line]
    assert len(listed) == min(max_listed, 8)


def test_an_image_over_pils_pixel_limit_is_a_bad_file_naming_it(tiny_paddy, tmp_path):
    data_dir = _copy(tiny_paddy, tmp_path)
    row = _first_row(data_dir)
    Image.new("L", (12000, 12000)).save(data_dir / "train_images" / row.label / row.image_id, format="PNG")
    message = _one_line_error(data_dir)
    assert f"train_images/{row.label}/{row.image_id}: 12000x12000 pixels, more than PIL's limit of" in message
    assert "skip_bad_images" in message


def test_empty_class_is_an_error(tiny_paddy, tmp_path):
    data_dir = _copy(tiny_paddy, tmp_path)
    train = pd.read_csv(data_dir / "train.csv")
    train[train.label != "tungro"].to_csv(data_dir / "train.csv", index=False)
    shutil.rmtree(data_dir / "train_images" / "tungro")
    assert "train.csv has no images of class 'tungro'" in _one_line_error(data_dir)


def test_test_image_missing_from_folder_is_an_error(tiny_paddy, tmp_path):
    data_dir = _copy(tiny_paddy, tmp_path)
    first = pd.read_csv(data_dir / "sample_submission.csv").image_id[0]
    (data_dir / "test_images" / first).unlink()
    assert f"test_images/{first}: listed in sample_submission.csv but missing" in _one_line_error(data_dir)


def test_test_image_not_in_sample_submission_is_an_error(tiny_paddy, tmp_path):
    data_dir = _copy(tiny_paddy, tmp_path)
    first = pd.read_csv(data_dir / "sample_submission.csv").image_id[0]
    shutil.copy(data_dir / "test_images" / first, data_dir / "test_images" / "300000.jpg")
    assert "test_images/300000.jpg: not listed in sample_submission.csv" in _one_line_error(data_dir)


def test_skip_bad_images_leaves_bad_training_files_out_and_lists_them(tiny_paddy, tmp_path):
    data_dir = _copy(tiny_paddy, tmp_path)
    row = _first_row(data_dir)
    image = data_dir / "train_images" / row.label / row.image_id
    image.write_bytes(b"not a jpeg")
    (data_dir / "train_images" / "leaf_rust").mkdir()
    (data_dir / "train_images" / "leaf_rust" / "1.jpg").write_bytes(b"stray")
    record = prepare_data(_config(str(data_dir), skip_bad_images=True), 0, tmp_path / "paddy", tmp_path / "dl")

    skipped = {entry["file"] for entry in record["skipped"]}
    assert skipped == {f"train_images/{row.label}/{row.image_id}", "train_images/leaf_rust/1.jpg"}
    assert record["counts"]["train"] == 9 * 8 + 4 - 1
    assert row.image_id not in pd.read_csv(tmp_path / "paddy" / "train.csv").image_id.tolist()
    assert not (tmp_path / "paddy" / "train_images" / "leaf_rust").exists()
    metrics = paddy_data.data_metrics(record, "demo")
    assert metrics["n_skipped"] == 2 and metrics["skipped"] == record["skipped"]


def test_skip_bad_images_never_skips_a_test_image(tiny_paddy, tmp_path):
    data_dir = _copy(tiny_paddy, tmp_path)
    first = pd.read_csv(data_dir / "sample_submission.csv").image_id[0]
    (data_dir / "test_images" / first).write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=f"test_images/{first}: not a readable image.*every test image"):
        verify_dataset(data_dir, skip_bad_images=True)


# -- atomicity -------------------------------------------------------------------------------------------------------


def _previous_data(tmp_path: Path) -> Path:
    data_dir = tmp_path / "paddy"
    prepare_data(_config("synthetic"), 1, data_dir, tmp_path / "downloads")
    return data_dir


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_extraction_interrupted_midway_leaves_the_previous_data_intact(tiny_paddy, tmp_path, monkeypatch):
    data_dir = _previous_data(tmp_path)
    before = _snapshot(data_dir)
    archive = _competition_zip(tiny_paddy, tmp_path / "paddy.zip")

    def extract_some_then_die(bundle, path):
        for member in bundle.infolist()[:10]:
            bundle.extract(member, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(zipfile.ZipFile, "extractall", extract_some_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(_config(str(archive)), 0, data_dir, tmp_path / "downloads")
    assert _snapshot(data_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paddy", "paddy.zip"]  # no partial folder left


def test_the_scratch_folder_of_a_killed_extraction_is_removed_by_the_next_run(tmp_path, dead_pid):
    left_by_kill = tmp_path / f".paddy.{dead_pid}.q1w2e3r4.partial"
    (left_by_kill / "unpacked" / "train_images").mkdir(parents=True)
    prepare_data(_config("synthetic"), 0, tmp_path / "paddy", tmp_path / "downloads")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paddy"]


@pytest.mark.parametrize("entry", ["../../x.jpg", "/etc/x.jpg", "train_images/../../x.jpg", r"C:\x.jpg"])
def test_a_zip_entry_pointing_outside_the_data_folder_is_refused_by_name(tiny_paddy, tmp_path, entry):
    data_dir = _previous_data(tmp_path)
    before = _snapshot(data_dir)
    archive = _competition_zip(tiny_paddy, tmp_path / "paddy.zip")
    with zipfile.ZipFile(archive, "a") as bundle:
        bundle.writestr(entry, b"planted")
    with pytest.raises(DataError) as caught:
        prepare_data(_config(str(archive)), 0, data_dir, tmp_path / "downloads")
    assert str(caught.value).startswith(f"{archive}: entry {entry!r} points outside the folder")
    assert "\n" not in str(caught.value)
    assert _snapshot(data_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["paddy", "paddy.zip"]  # nothing landed beside them


def test_data_failing_verification_is_never_swapped_in(tiny_paddy, tmp_path):
    data_dir = _previous_data(tmp_path)
    before = _snapshot(data_dir)
    broken = _copy(tiny_paddy, tmp_path)
    next((broken / "train_images" / CLASSES[0]).iterdir()).unlink()
    with pytest.raises(DataError):
        prepare_data(_config(str(broken)), 0, data_dir, tmp_path / "downloads")
    assert _snapshot(data_dir) == before


def test_killed_download_caches_nothing_and_keeps_the_previous_data(tmp_path, fake_kaggle):
    data_dir = _previous_data(tmp_path)
    before = _snapshot(data_dir)
    fake_kaggle.failure = ConnectionError("connection reset")
    with pytest.raises(DataError, match=r"the Kaggle API failed \(ConnectionError\); check the network"):
        prepare_data(_config("kaggle"), 0, data_dir, tmp_path / "downloads")
    assert list((tmp_path / "downloads").iterdir()) == []
    assert _snapshot(data_dir) == before


# -- the stage -------------------------------------------------------------------------------------------------------


def test_main_writes_data_and_metrics_with_the_profile(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = {
        "profile": "demo",
        "seed": 3,
        "data": {
            "source": "synthetic",
            "skip_bad_images": False,
            "synthetic": {"train_per_class": 4, "n_test": 5, "image_size": [32, 40]},
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    paddy_data.main()
    metrics = json.loads((tmp_path / "metrics" / "data.json").read_text())
    assert metrics["profile"] == "demo" and metrics["source"] == "synthetic"
    assert metrics["counts"]["train"] == 9 * 4 + 2 and metrics["counts"]["test"] == 5
    assert metrics["smallest_class"] == {"label": SMALLEST_CLASS, "count": 2}
    assert metrics["skipped"] == [] and (tmp_path / "data" / "paddy" / "SOURCE.json").is_file()


def test_bad_synthetic_param_is_a_one_line_exit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = yaml.safe_load(Path(__file__).parents[1].joinpath("params.yaml").read_text())
    params["data"]["synthetic"]["train_per_class"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit, match="paddy_data: params.yaml: key 'data.synthetic.train_per_class' is 1; use at least 2"):
        paddy_data.main()
