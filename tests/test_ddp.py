"""train@<member> on several processes: DDP over gloo on CPU through the stage's own command, and its parts.

The end-to-end runs train a small member for real with `python -m pipeline.train` and `train.devices: 2` (two
processes over gloo, torch's launcher): the first run is killed (SIGKILL, every process) once its first epoch's
checkpoint is on disk, the second resumes it; a 1-process run of the same member is the reference.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
import yaml

from pipeline import distributed, paddy, train
from pipeline.paddy import CLASSES, validation_mask
from pipeline.params import ParamsError
from pipeline.synthetic import write_synthetic_dataset
from pipeline.vision import MemberConfig, batch_size

ROOT = Path(__file__).resolve().parents[1]
# Small enough for CI, large enough to learn well above chance (0.1), so that matching the 1-process accuracy means
# something: 24 images a class at 48x64, resnet10t at 32 px, 5 epochs.
DDP_PADDY = dict(train_per_class=24, n_test=30, image_size=(48, 64), seed=0)
# ema=None: the reference run builds MemberConfig(**MEMBER) with its defaults, the launched ones read params.yaml,
# whose member_defaults (the demo's ema 0.999) would otherwise make them train a different member.
MEMBER = dict(arch="resnet10t", resize=40, method="squish", size=32, epochs=5, lr=0.01, schedule="fit_one_cycle",
              accum=1, ema=None)
BS, SEED, VALID = 16, 0, dict(valid_pct=0.25, seed=0)
# The two runs are two samples of the same training, not one computation: each process normalises its own half
# of the step batch (DDP refuses SyncBatchNorm on CPU; on GPUs it is synchronised), the processes' halves of the
# shuffled order make different batches, and augmentation draws differ (seed + rank). Measured here: 1 process
# 0.51 to 0.84 over seeds 0-3, 2 processes 0.40, and on the lock of 2026-12 (seed 0) 0.74 against 0.35: a gap
# between the two is within the seed-to-seed spread, so no closeness is asserted. What is asserted: the steps are
# exact, and both learn, well above chance (0.1): a two-process run that learns nothing (its ranks' gradients not
# averaged, a rank training on the other's labels) stays near 0.1.
LEARNED_ACCURACY = 0.25


@pytest.fixture(scope="module")
def ddp_paddy(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("ddp_paddy") / "paddy"
    write_synthetic_dataset(data_dir, **DDP_PADDY)
    return data_dir


def project(root: Path, data_dir: Path, devices) -> Path:
    """A project folder with params.yaml (one member, `tiny`) and data/paddy linked to `data_dir`."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["seed"] = SEED
    params["validation"] = dict(params["validation"], **VALID)
    params["train"] = dict(params["train"], bs=BS, tta=True, devices=devices, members={"tiny": MEMBER})
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "data").mkdir()
    (root / "data" / "paddy").symlink_to(data_dir)
    return root


def stage_command() -> tuple[list[str], dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return [sys.executable, "-m", "pipeline.train", "tiny"], env


def completed_epochs(root: Path) -> int:
    state = root / "models" / "checkpoints" / "tiny" / "state.json"
    return json.loads(state.read_text())["completed_epochs"] if state.is_file() else 0


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process it started (torch's workers run in sessions of their own)."""
    launcher = psutil.Process(process.pid)
    for member in [*launcher.children(recursive=True), launcher]:
        member.send_signal(signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="module")
def two_processes(ddp_paddy, tmp_path_factory):
    """(project root, killed run's return code, resumed run's log, its metrics)."""
    root = project(tmp_path_factory.mktemp("two"), ddp_paddy, devices=2)
    command, env = stage_command()
    first = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while completed_epochs(root) < 1 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_tree(first)
    resumed = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return root, first.returncode, resumed.stderr, train.read_json(root / "metrics" / "train" / "tiny.json")


@pytest.fixture(scope="module")
def one_process(ddp_paddy, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes has
    try:
        cfg = train.StageConfig(
            profile="demo", seed=SEED, name="tiny", member=MemberConfig(**MEMBER), bs=BS, tta=True,
            validation=train.ValidationConfig(**VALID, full=False),
        )
        return train.run_stage(cfg, data_dir=ddp_paddy, root=tmp_path_factory.mktemp("one"))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_from_its_checkpoint_and_finishes(two_processes):
    root, killed_returncode, _, metrics = two_processes
    assert killed_returncode == -signal.SIGKILL
    assert 1 <= metrics["resumed_from_epoch"] < MEMBER["epochs"]
    assert metrics["processes"] == 2
    assert (root / "models" / "tiny.pth").is_file()
    assert not (root / "models" / "checkpoints" / "tiny").exists()


@pytest.mark.slow
def test_two_processes_write_each_output_once(two_processes):
    root, _, log, metrics = two_processes
    assert log.count("[train] tiny: valid error rate") == 1  # rank 0 alone writes and reports
    live = root / "dvclive" / "train" / "tiny" / "plots" / "metrics"
    for curve in ("train/loss.tsv", "eval/loss.tsv", "error_rate.tsv"):
        steps = pd.read_csv(live / curve, sep="\t")["step"].tolist()
        assert steps == list(range(MEMBER["epochs"])), curve  # one logger, resumed where it stopped
    assert not [path for path in root.rglob("*") if ".partial" in path.name]  # no half-written or clashing output
    assert train.read_json(root / "metrics" / "train" / "tiny.json") == metrics


@pytest.mark.slow
def test_two_process_predictions_cover_every_image_once_in_order(two_processes, ddp_paddy):
    root, *_ = two_processes
    test = pd.read_csv(root / "preds" / "tiny" / "test.csv")
    assert test["image_id"].tolist() == paddy.test_image_ids(ddp_paddy)  # sample_submission's order
    valid = pd.read_csv(root / "preds" / "tiny" / "valid.csv")
    table = pd.read_csv(ddp_paddy / "train.csv")
    assert valid["image_id"].tolist() == table[validation_mask(table["label"], **VALID)]["image_id"].tolist()
    assert valid[list(CLASSES)].notna().all().all()


@pytest.mark.slow
def test_two_processes_take_the_optimiser_steps_of_one_and_learn(two_processes, one_process):
    _, _, _, two = two_processes
    assert (two["process_step_images"], one_process["process_step_images"]) == (BS // 2, BS)
    assert two["optimizer_steps"] == one_process["optimizer_steps"]
    accuracies = (two["valid_accuracy"], one_process["valid_accuracy"])
    assert min(accuracies) >= LEARNED_ACCURACY, accuracies


# -- the parts, in one process -----------------------------------------------------------------------------------


def test_auto_devices_is_every_visible_gpu_and_one_process_on_a_cpu():
    assert distributed.process_count("auto", visible_gpus=0) == 1
    assert distributed.process_count("auto", visible_gpus=1) == 1
    assert distributed.process_count("auto", visible_gpus=4) == 4
    assert distributed.process_count(2, visible_gpus=0) == 2  # gloo on CPU, as the test above runs
    with pytest.raises(ParamsError, match="train.devices is 4 but 2 GPU"):
        distributed.process_count(4, visible_gpus=2)


@pytest.mark.parametrize("bs, accum, processes", [(64, 1, 1), (64, 2, 1), (64, 1, 8), (64, 2, 4), (32, 4, 2)])
def test_the_optimiser_sees_bs_images_per_step_whatever_the_processes(bs, accum, processes):
    step_batch = batch_size(distributed.process_batch(bs, processes), accum)  # what each process loads
    assert step_batch * accum * processes == bs


def test_the_ranks_shares_cover_every_row_once_in_order(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    for n_rows in (0, 1, 2, 7, 3469):
        rows = []
        for rank in range(3):
            monkeypatch.setenv("RANK", str(rank))
            rows += list(range(n_rows))[distributed.shard(n_rows)]
        assert rows == list(range(n_rows))


def test_an_out_of_memory_rank_restarts_every_rank_with_accum_doubled(monkeypatch):
    launches = []

    def launch(module, args, processes):
        launches.append(args)
        # The first launch: rank 1 runs out of memory, the launcher stops rank 0 (SIGTERM).
        return {distributed.OOM_EXIT_CODE, -signal.SIGTERM} if len(launches) == 1 else set()

    monkeypatch.setattr(distributed, "launch", launch)
    assert distributed.launch_with_oom_retries("pipeline.train", ["tiny"], 2, log=lambda message: None) == 1
    assert launches == [["tiny", "--oom-retries", "0"], ["tiny", "--oom-retries", "1"]]


def test_another_failure_of_a_rank_is_not_retried(monkeypatch):
    monkeypatch.setattr(distributed, "launch", lambda module, args, processes: {1, -signal.SIGTERM})
    with pytest.raises(SystemExit, match="exit codes"):
        distributed.launch_with_oom_retries("pipeline.train", ["tiny"], 2, log=lambda message: None)


def test_under_ddp_out_of_memory_stops_the_rank_instead_of_retrying_alone(monkeypatch):
    calls = []

    def fit_that_runs_out_of_memory(cfg, table, accum, *args, **kwargs):
        calls.append(accum)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(train, "fit_member", fit_that_runs_out_of_memory)
    cfg = train.StageConfig(
        profile="demo", seed=0, name="tiny", member=MemberConfig(**MEMBER), bs=BS, tta=False,
        validation=train.ValidationConfig(**VALID, full=False),
    )
    with pytest.raises(distributed.RestartWithDoubledAccum):
        train.train_with_oom_fallback(cfg, pd.DataFrame(), 1, checkpoints=None, live=None)
    assert calls == [1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="states what a CPU machine starts")
def test_the_device_check_prints_the_processes_train_would_start(tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    distributed.main([])
    assert capsys.readouterr().out == "train.devices=auto: 1 process on the CPU\n"
    distributed.main(["--devices", "2"])
    assert capsys.readouterr().out == "train.devices=2: 2 process(es) over gloo on the CPU\n"
