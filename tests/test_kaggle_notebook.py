"""notebooks/kaggle.ipynb's own cells, run on CPU in a fake Kaggle notebook: two sessions, then the submit cell.

The fake: /kaggle/working and /kaggle/input are folders under tmp_path, KAGGLE_KERNEL_RUN_TYPE is set, and the
competition is "attached" read-only (tiny synthetic images in its layout; PADDY_KAGGLE_INPUT points at it). The
"fork" is a git repository of this working tree. The demo profile with data.source: kaggle and tiny members stands
in for the competition profile. The install cell is not run: it would install into this test's own Python.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.paddy import COMPETITION
from pipeline.synthetic import write_synthetic_dataset

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "kaggle.ipynb"
SECRET = "fake-secret-value-42"
RUNNING_STAGE = re.compile(r"Running stage '([^']+)'")
TINY_MEMBERS = {
    "full_size": {"arch": "resnet10t", "resize": 24, "size": 16, "epochs": 1},
    "pre_resized": {"arch": "resnet10t", "resize": 24, "size": 16, "epochs": 1, "images": "small"},
}
TINY_PARAMS = {
    "data": {"source": "kaggle"},
    "small_images": {"max_size": 24},
    "probe": {"accums": [1]},
    "movielens": {"source": "tests/fixtures/movielens"},
    "collab": {"epochs": 1, "bs": 16, "report_min_ratings": 5},
}


def cells() -> list[dict]:
    return [cell for cell in json.loads(NOTEBOOK.read_text())["cells"] if cell["cell_type"] == "code"]


def source(cell: dict, kaggle: Path) -> str:
    return "".join(cell["source"]).replace("/kaggle/", f"{kaggle}/")


def run_cell(cell: dict, kaggle: Path, cwd: Path, env: dict) -> tuple[Path, str]:
    """Run a shell cell (`%%bash`, `!command`, `%cd`) as Jupyter would; returns the new directory and the output."""
    text, output = source(cell, kaggle), ""
    commands = [text.removeprefix("%%bash\n")] if text.startswith("%%bash") else text.splitlines()
    for command in commands:
        if command.startswith("%cd "):
            cwd = Path(command.removeprefix("%cd ").strip())
            continue
        result = subprocess.run(["bash", "-c", command.removeprefix("!")], cwd=cwd, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        output += result.stdout
        assert result.returncode == 0, f"{command} failed:\n{result.stdout[-5000:]}"
    return cwd, output


def shell_cells_of_a_session(kaggle: Path, env: dict) -> tuple[Path, str]:
    """Every shell cell in order (the install cell left out)."""
    cwd, output = kaggle / "working", ""
    for cell in cells():
        text = source(cell, kaggle)
        if text.startswith("import"):  # the python cells: settings (the test's env) and submit (run apart)
            continue
        if "kaggle.sh install" in text:
            continue
        cwd, cell_output = run_cell(cell, kaggle, cwd, env)
        output += cell_output
    return cwd, output


def fork_of_this_tree(fork: Path, env: dict) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (fork / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, fork / name)
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "fork"]):
        subprocess.run(command, cwd=fork, env=env, check=True)


def tiny_demo_profile(fork: Path, env: dict) -> None:
    """The fork's demo profile trains the tiny members (a user's fork may edit its profiles), params.yaml rendered
    from it and committed: the notebook's `make profile` then writes the same file in every session."""
    profile = yaml.safe_load((fork / "pipeline" / "profiles" / "demo.yaml").read_text())
    for section, values in TINY_PARAMS.items():
        profile[section] = profile.get(section, {}) | values
    profile["train"] = profile["train"] | {"bs": 8, "members": TINY_MEMBERS}
    profile["ensemble"] = profile.get("ensemble", {}) | {"weights": {name: 1 for name in TINY_MEMBERS}}
    (fork / "pipeline" / "profiles" / "demo.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    rendered = subprocess.run([sys.executable, "-m", "pipeline.profile", "demo", "--print"], cwd=fork,
                              env=env | {"PYTHONPATH": str(fork)}, capture_output=True, text=True, check=True)
    (fork / "params.yaml").write_text(rendered.stdout)
    for command in (["git", "add", "-A"], ["git", "commit", "-qm", "tiny demo profile"]):
        subprocess.run(command, cwd=fork, env=env, check=True)


@pytest.fixture
def fake_kaggle(tmp_path) -> tuple[Path, dict]:
    kaggle = tmp_path / "kaggle"
    mounted = kaggle / "input" / COMPETITION
    write_synthetic_dataset(mounted, train_per_class=8, n_test=10, image_size=(32, 48), seed=0)
    for path in [mounted, *mounted.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    (kaggle / "working").mkdir()
    (tmp_path / "fork").mkdir()
    # Nor make's variables: `make test ARGS=...` exports them, and the cells' own `make profile` would take its ARGS.
    makes = ("ARGS", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")
    env = {name: value for name, value in os.environ.items() if not name.startswith("KAGGLE_") and name not in makes}
    env |= {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": str(kaggle / "working" / "paddy-pipeline"),  # what the install cell's editable install does
        "HOME": str(tmp_path / "home"),  # no Kaggle credentials anywhere
        "OMP_NUM_THREADS": "1",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
        "KAGGLE_KERNEL_RUN_TYPE": "Batch",
        "PADDY_KAGGLE_INPUT": str(kaggle / "input"),
        # The settings cell's variables:
        "REPO_URL": str(tmp_path / "fork"),
        "PROFILE": "demo",
        "JOBS": "2",
        "TRAIN_HOURS": "1",
        "PREVIOUS": "",
    }
    fork_of_this_tree(tmp_path / "fork", env)
    tiny_demo_profile(tmp_path / "fork", env)
    yield kaggle, env
    for path in [mounted, *mounted.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_the_settings_cell_sets_what_the_other_cells_read():
    settings = "".join(cells()[0]["source"])
    assert set(re.findall(r'os\.environ\["(\w+)"\]', settings)) == {"REPO_URL", "PROFILE", "JOBS", "TRAIN_HOURS", "PREVIOUS"}


def test_the_notebook_trains_in_place_resumes_in_a_new_session_and_submits_without_printing_the_token(
    fake_kaggle, tmp_path
):
    kaggle, env = fake_kaggle
    repo, output = shell_cells_of_a_session(kaggle, env)
    ran = RUNNING_STAGE.findall(output)
    assert {"paddy_data", "small_images", "train@full_size", "train@pre_resized", "ensemble"} <= set(ran)
    assert "in place" in output and "images in data/paddy_small" in output
    mounted = kaggle / "input" / COMPETITION
    assert (repo / "data/paddy/train_images").resolve() == mounted / "train_images"  # linked, not copied
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["paddy_data"]["outs"]
    assert next(out for out in lock if out["path"] == "data/paddy")["nfiles"] == 3  # the tables and SOURCE.json
    assert (repo / "models/full_size.pth").stat().st_nlink == 2  # one copy, shared with DVC's cache
    assert (repo / "submissions/submission.csv").is_file()

    # The next session: the saved output attached as PREVIOUS, the same cells; nothing trains again. The worst a
    # saved output can do: hard links saved as separate files, the links into the mount left out.
    previous = kaggle / "input" / "previous-version" / "paddy-pipeline"
    shutil.copytree(repo, previous, symlinks=True, ignore=lambda folder, names: [
        name for name in names if (Path(folder) / name).is_symlink()])
    shutil.rmtree(repo)
    _, output = shell_cells_of_a_session(kaggle, env | {"PREVIOUS": str(previous)})
    assert "resuming the run saved in" in output
    # paddy_data: its data is relinked (forced); paddy_source: it fingerprints a local source at every dvc repro
    assert [stage for stage in RUNNING_STAGE.findall(output) if stage not in ("paddy_data", "paddy_source")] == []
    assert (repo / "data/paddy/train_images").resolve() == mounted / "train_images"  # relinked
    assert (repo / "models/full_size.pth").stat().st_nlink == 2

    # The submit cell: the token reaches `make submit`, which refuses this fake data; the token is never printed.
    fake_secrets = tmp_path / "fake_secrets"
    fake_secrets.mkdir()
    (fake_secrets / "kaggle_secrets.py").write_text(
        f"class UserSecretsClient:\n    def get_secret(self, name):\n        return {SECRET!r} + name\n"
    )
    submit = subprocess.run(
        [sys.executable, "-c", source(cells()[-1], kaggle)], cwd=repo, text=True, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, env=env | {"PYTHONPATH": f"{fake_secrets}{os.pathsep}{repo}"},
    )
    assert submit.returncode != 0 and "\nsubmit: " in submit.stdout and "competition has 10407" in submit.stdout
    assert SECRET not in submit.stdout
