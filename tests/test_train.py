"""train@<member>: outputs in the ensemble's contract, resume after a kill, OOM fallback, local pretrained weights."""

from __future__ import annotations

import copy
import dataclasses
import errno
import io
import shutil
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import yaml
from fastai.callback.core import Callback
from fastai.learner import Learner

from pipeline import train, vision
from pipeline import paddy
from pipeline.common import NoSpaceError
from pipeline.paddy import CLASSES, validation_mask
from pipeline.vision import MemberConfig

TINY_MEMBER = dict(arch="resnet10t", resize=40, method="squish", size=32, epochs=2, lr=0.01, schedule="fit_one_cycle")


def stage_config(name="tiny", full=False, tta=True, **member) -> train.StageConfig:
    return train.StageConfig(
        profile="demo",
        seed=0,
        name=name,
        member=MemberConfig(**(TINY_MEMBER | dict(accum=1) | member)),
        bs=16,
        tta=tta,
        validation=train.ValidationConfig(valid_pct=0.25, seed=0, full=full),
    )


@pytest.fixture(scope="module")
def trained(tiny_paddy, tmp_path_factory):
    """One uninterrupted multi-target run: (config, metrics, output root)."""
    root = tmp_path_factory.mktemp("trained")
    cfg = stage_config(targets="label+variety", epochs=3)
    return cfg, train.run_stage(cfg, data_dir=tiny_paddy, root=root), root


def test_test_predictions_follow_sample_submission_order_and_class_vocab(trained, tiny_paddy):
    cfg, _, root = trained
    test = pd.read_csv(root / "preds" / cfg.name / "test.csv")
    assert list(test.columns) == ["image_id", *CLASSES]
    assert test["image_id"].tolist() == paddy.test_image_ids(tiny_paddy)
    np.testing.assert_allclose(test[list(CLASSES)].sum(axis=1), 1, atol=1e-4)


def test_valid_predictions_cover_the_shared_split_with_true_labels(trained, tiny_paddy):
    cfg, _, root = trained
    valid = pd.read_csv(root / "preds" / cfg.name / "valid.csv")
    table = pd.read_csv(tiny_paddy / "train.csv")
    shared = table[validation_mask(table["label"], cfg.validation.valid_pct, cfg.validation.seed)]
    assert list(valid.columns) == ["image_id", "label", *CLASSES]
    assert valid["image_id"].tolist() == shared["image_id"].tolist()
    assert valid["label"].tolist() == shared["label"].tolist()
    np.testing.assert_allclose(valid[list(CLASSES)].sum(axis=1), 1, atol=1e-4)


def test_metrics_record_the_run(trained):
    cfg, metrics, root = trained
    assert metrics == train.read_json(root / "metrics" / "train" / f"{cfg.name}.json")
    assert metrics["profile"] == "demo" and metrics["member"] == "tiny" and metrics["arch"] == "resnet10t"
    assert (metrics["accum"], metrics["accum_source"], metrics["oom_retries"]) == (1, "params", 0)
    assert metrics["precision"] == "fp32" and metrics["device"] == "cpu"
    assert metrics["peak_reserved_gib"] is None and metrics["peak_allocated_gib"] is None  # CUDA's peaks only
    assert metrics["valid_error_rate"] == pytest.approx(1 - metrics["valid_accuracy"])
    assert 0 <= metrics["valid_variety_error_rate"] <= 1
    assert metrics["images_per_second"] > 0


def test_a_finished_run_leaves_weights_plots_and_no_checkpoints(trained):
    cfg, _, root = trained
    weights = torch.load(root / "models" / f"{cfg.name}.pth", weights_only=False)
    assert weights["classes"] == list(CLASSES) and weights["n_out"] == 20
    live = root / "dvclive" / "train" / cfg.name / "plots"
    assert (live / "images" / "top_losses.png").is_file()
    assert (live / "sklearn" / "confusion_matrix.json").is_file()
    assert len(pd.read_csv(live / "metrics" / "train" / "loss.tsv", sep="\t")) == cfg.member.epochs
    assert not (root / "models" / "checkpoints" / cfg.name).exists()


def test_the_top_losses_grid_shows_the_worst_validation_images(tiny_paddy):
    table = train.split_table(tiny_paddy, train.ValidationConfig(valid_pct=0.25, seed=0, full=False))
    valid = table.loc[table["is_valid"], ["image_id", "label"]].reset_index(drop=True)
    valid = valid.join(pd.DataFrame(np.full((len(valid), len(CLASSES)), 1 / len(CLASSES)), columns=list(CLASSES)))
    logged = {}

    class Live:
        def log_sklearn_plot(self, *args, **kwargs):
            pass

        def log_image(self, name, figure):
            logged[name] = figure

    train.log_interpretation(Live(), valid, table)
    shown = [ax for ax in logged["top_losses.png"].axes if ax.images]
    assert len(shown) == min(train.TOP_LOSSES, len(valid)) > 0


class Killed(Exception):
    """Stands in for a kill after a checkpoint is on disk."""


def test_a_killed_run_resumes_from_its_last_epoch_with_the_same_result(trained, tiny_paddy, tmp_path, monkeypatch):
    cfg, metrics, root = trained
    save = train.Checkpoints.save

    def save_then_die(self, learn, completed_epochs):
        save(self, learn, completed_epochs)
        if completed_epochs == 2:
            raise Killed("killed after epoch 2")

    monkeypatch.setattr(train.Checkpoints, "save", save_then_die)
    with pytest.raises(Killed):
        train.run_stage(cfg, data_dir=tiny_paddy, root=tmp_path)
    monkeypatch.setattr(train.Checkpoints, "save", save)
    resumed = train.run_stage(cfg, data_dir=tiny_paddy, root=tmp_path)

    assert resumed["resumed_from_epoch"] == 2
    expected = torch.load(root / "models" / f"{cfg.name}.pth", weights_only=False)["state_dict"]
    actual = torch.load(tmp_path / "models" / f"{cfg.name}.pth", weights_only=False)["state_dict"]
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert resumed["valid_error_rate"] == metrics["valid_error_rate"]
    loss = pd.read_csv(tmp_path / "dvclive" / "train" / cfg.name / "plots" / "metrics" / "train" / "loss.tsv", sep="\t")
    assert loss["step"].tolist() == list(range(cfg.member.epochs))


def test_a_run_killed_during_tta_resumes_into_its_trained_model_and_keeps_the_old_plots_until_done(
    trained, tiny_paddy, tmp_path, monkeypatch
):
    cfg, metrics, root = trained
    published = tmp_path / "dvclive" / "train" / cfg.name
    (published / "plots").mkdir(parents=True)
    (published / "plots" / "previous_run.txt").write_text("the last good run's plots")

    def killed_during_tta(*args, **kwargs):
        raise Killed("killed during TTA, after the last epoch's checkpoint")

    with monkeypatch.context() as patched:
        patched.setattr(train, "prediction_frames", killed_during_tta)
        with pytest.raises(Killed):
            train.run_stage(cfg, data_dir=tiny_paddy, root=tmp_path)
    assert sorted(path.name for path in published.rglob("*")) == ["plots", "previous_run.txt"]

    resumed = train.run_stage(cfg, data_dir=tiny_paddy, root=tmp_path)

    assert resumed["resumed_from_epoch"] == cfg.member.epochs
    expected = torch.load(root / "models" / f"{cfg.name}.pth", weights_only=False)["state_dict"]
    actual = torch.load(tmp_path / "models" / f"{cfg.name}.pth", weights_only=False)["state_dict"]
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    for preds in ("test.csv", "valid.csv"):
        assert (tmp_path / "preds" / cfg.name / preds).read_bytes() == (root / "preds" / cfg.name / preds).read_bytes()
    assert plot_files(tmp_path, cfg.name) == plot_files(root, cfg.name)
    assert not (tmp_path / "models" / "checkpoints" / cfg.name).exists()


def plot_files(root, name) -> dict:
    """Every file of a member's published DVCLive plots, by path, with its bytes."""
    plots = root / "dvclive" / "train" / name / "plots"
    return {str(path.relative_to(plots)): path.read_bytes() for path in sorted(plots.rglob("*")) if path.is_file()}


def test_a_checkpoint_of_another_config_is_not_resumed(tiny_paddy, tmp_path):
    cfg = stage_config(epochs=1)
    checkpoints = train.Checkpoints(tmp_path, train.run_fingerprint(cfg, train.split_table(tiny_paddy, cfg.validation)))
    checkpoints.start(lr=0.01, lr_suggestion=None)
    other = stage_config(epochs=1, lr=0.02)
    assert train.Checkpoints(tmp_path, train.run_fingerprint(other, train.split_table(tiny_paddy, other.validation))).state() is None
    assert checkpoints.state()["completed_epochs"] == 0


def test_cuda_out_of_memory_doubles_accum_and_retries(tiny_paddy, tmp_path, monkeypatch):
    fit = train.fit_member
    calls = []

    def fit_that_runs_out_of_memory_once(cfg, table, accum, *args, **kwargs):
        calls.append(accum)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return fit(cfg, table, accum, *args, **kwargs)

    monkeypatch.setattr(train, "fit_member", fit_that_runs_out_of_memory_once)
    metrics = train.run_stage(stage_config(epochs=1, accum=2, tta=False), data_dir=tiny_paddy, root=tmp_path)
    assert calls == [2, 4]
    assert (metrics["accum"], metrics["oom_retries"]) == (4, 1)


def test_out_of_memory_mid_epoch_resumes_from_the_checkpoint_at_double_accum_with_its_optimiser_state(
    tiny_paddy, tmp_path, monkeypatch
):
    cfg = stage_config(epochs=2, accum=1, tta=False)
    at_fit_start, checkpointed = [], {}

    class OutOfMemoryOnceInEpoch2(Callback):
        def before_fit(self):
            if not hasattr(self.learn, "gather_preds"):  # get_preds runs before_fit too
                at_fit_start.append(copy.deepcopy(self.learn.opt.state_dict()))  # training updates it in place

        def before_batch(self):
            if self.training and self.epoch == 1 and self.iter == 1 and not checkpointed:
                checkpointed.update(torch.load(self.learn.path / "epoch_1.pth", weights_only=False)["opt"])
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    member_learner = vision.member_learner

    def learner_that_runs_out_of_memory(*args, **kwargs):
        learn = member_learner(*args, **kwargs)
        learn.add_cb(OutOfMemoryOnceInEpoch2())
        return learn

    with monkeypatch.context() as patched:
        patched.setattr(vision, "member_learner", learner_that_runs_out_of_memory)
        metrics = train.run_stage(cfg, data_dir=tiny_paddy, root=tmp_path / "oom")

    assert (metrics["accum"], metrics["oom_retries"], metrics["resumed_from_epoch"]) == (2, 1, 1)
    assert len(at_fit_start) == 2 and same_optimiser_state(at_fit_start[1]["state"], checkpointed["state"])
    # The same as a run killed after epoch 1 and resumed at accum 2.
    save = train.Checkpoints.save

    def save_then_die(self, learn, completed_epochs):
        save(self, learn, completed_epochs)
        raise Killed("killed after epoch 1")

    with monkeypatch.context() as patched:
        patched.setattr(train.Checkpoints, "save", save_then_die)
        with pytest.raises(Killed):
            train.run_stage(cfg, data_dir=tiny_paddy, root=tmp_path / "resumed")
    train.run_stage(stage_config(epochs=2, accum=2, tta=False), data_dir=tiny_paddy, root=tmp_path / "resumed")
    expected = torch.load(tmp_path / "resumed" / "models" / "tiny.pth", weights_only=False)["state_dict"]
    actual = torch.load(tmp_path / "oom" / "models" / "tiny.pth", weights_only=False)["state_dict"]
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    test_preds = [(tmp_path / run / "preds" / "tiny" / "test.csv").read_bytes() for run in ("oom", "resumed")]
    assert test_preds[0] == test_preds[1]


def same_optimiser_state(actual: list[dict], expected: list[dict]) -> bool:
    """fastai's per-parameter optimiser state (Adam's averages and step counts): equal, tensors exactly."""
    if len(actual) != len(expected) or not any(expected):
        return False
    for got, want in zip(actual, expected):
        if got.keys() != want.keys():
            return False
        for key, value in want.items():
            same = torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value
            if not same:
                return False
    return True


def test_out_of_memory_doubles_accum_up_to_bs_then_is_raised(tiny_paddy, tmp_path, monkeypatch):
    tried = []

    def always_out_of_memory(cfg, table, accum, *args, **kwargs):
        tried.append(accum)
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(train, "fit_member", always_out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        train.run_stage(stage_config(epochs=1, accum=4), data_dir=tiny_paddy, root=tmp_path)
    assert tried == [4, 8, 16]  # bs is 16: one try per accum up to it, none beyond


def test_full_training_writes_header_only_validation_predictions(tiny_paddy, tmp_path):
    cfg = stage_config(epochs=1, full=True, tta=False)
    metrics = train.run_stage(cfg, data_dir=tiny_paddy, root=tmp_path)
    valid = pd.read_csv(tmp_path / "preds" / cfg.name / "valid.csv")
    assert list(valid.columns) == ["image_id", "label", *CLASSES] and valid.empty
    assert metrics["valid_error_rate"] is None and metrics["train_images"] == len(pd.read_csv(tiny_paddy / "train.csv"))


def test_accum_comes_from_the_probe_unless_params_set_it(tmp_path):
    probe = tmp_path / "probe.json"
    probe.write_text('{"member": "tiny", "chosen_accum": 4, "accum": 4, "accum_source": "probe"}')
    assert train.member_accum(MemberConfig(**TINY_MEMBER), probe, 16) == (4, "probe")
    assert train.member_accum(MemberConfig(**TINY_MEMBER, accum=2), probe, 16) == (2, "params")
    with pytest.raises(train.TrainError, match="missing.json: not found; run `dvc repro probe`"):
        train.member_accum(MemberConfig(**TINY_MEMBER), tmp_path / "missing.json", 16)


def test_fine_tune_is_one_frozen_epoch_then_the_unfrozen_epochs_at_half_the_lr():
    frozen, unfrozen = train.schedule_phases(MemberConfig(**(TINY_MEMBER | dict(schedule="fine_tune", epochs=3))), 0.01)
    assert (frozen.frozen, frozen.epochs, frozen.lr) == (True, 1, slice(0.01))
    assert (unfrozen.frozen, unfrozen.epochs, unfrozen.lr) == (False, 3, slice(0.005 / 100, 0.005))


def test_local_pretrained_weights_load_without_network(tiny_paddy, tmp_path, monkeypatch):
    weights = tmp_path / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), weights)
    saved = torch.load(weights)

    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    member = MemberConfig(**(TINY_MEMBER | dict(pretrained=str(weights), schedule="fine_tune")))
    table = train.split_table(tiny_paddy, train.ValidationConfig(valid_pct=0.25, seed=0, full=False))
    dls = vision.member_dataloaders(member, table, bs=16, accum=1, seed=0)
    body = vision.member_learner(member, dls, bs=16, accum=1).model[0]
    loaded = body.state_dict()  # fastai's TimmBody wraps timm's model, created without its head (fc)
    body_keys = [key for key in saved if not key.startswith("fc.")]
    assert sorted(loaded) == sorted(f"model.{key}" for key in body_keys)
    assert all(torch.equal(loaded[f"model.{key}"], saved[key]) for key in body_keys)


def test_lr_find_suggestion_is_the_lr_the_schedule_uses_and_is_recorded(tiny_paddy, tmp_path, monkeypatch):
    suggested, scheduled = [], []
    lr_find, fit_one_cycle = Learner.lr_find, Learner.fit_one_cycle

    def recorded_lr_find(self, *args, **kwargs):
        # 10 iterations instead of fastai's 100 (minutes on this CPU): what is tested is where the suggestion goes.
        suggestion = lr_find(self, *args, **(kwargs | dict(num_it=10)))
        suggested.append(suggestion.valley)
        return suggestion

    def recorded_fit_one_cycle(self, n_epoch, lr_max=None, *args, **kwargs):
        scheduled.append(lr_max)
        return fit_one_cycle(self, n_epoch, lr_max, *args, **kwargs)

    monkeypatch.setattr(Learner, "lr_find", recorded_lr_find)
    monkeypatch.setattr(Learner, "fit_one_cycle", recorded_fit_one_cycle)
    metrics = train.run_stage(stage_config(epochs=1, lr="find", tta=False), data_dir=tiny_paddy, root=tmp_path)

    assert len(suggested) == 1 and suggested[0] != TINY_MEMBER["lr"]
    assert scheduled == suggested
    assert metrics["lr"] == metrics["lr_suggestion"] == pytest.approx(suggested[0])


@pytest.fixture
def project(tiny_paddy, tmp_path, monkeypatch):
    """A project folder with params.yaml for member `tiny` and the tiny dataset at data/paddy; the cwd."""
    shutil.copytree(tiny_paddy, tmp_path / "data" / "paddy")
    params = dict(
        profile="demo",
        seed=0,
        validation=dict(valid_pct=0.25, seed=0, full=False),
        train=dict(bs=16, tta=False, members=dict(tiny=TINY_MEMBER | dict(accum=1))),
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_bug_inside_training_is_raised_as_itself_not_as_a_one_line_error(project, monkeypatch):
    def run_stage_with_a_bug(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")  # what a pandas or torch bug looks like

    monkeypatch.setattr(train, "run_stage", run_stage_with_a_bug)
    with pytest.raises(ValueError, match="broadcast"):
        train.main(["tiny"])


def test_missing_data_is_a_one_line_error_naming_the_file_and_the_fix(project):
    shutil.rmtree(project / "data")
    with pytest.raises(SystemExit, match=r"^train: data/paddy/train.csv: not found; run `dvc repro paddy_data` first$"):
        train.main(["tiny"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's peak memory: needs a GPU")
def test_metrics_record_cuda_peak_memory_during_training(tiny_paddy, tmp_path):
    metrics = train.run_stage(stage_config(epochs=1, tta=False), data_dir=tiny_paddy, root=tmp_path)
    assert 0 < metrics["peak_allocated_gib"] <= metrics["peak_reserved_gib"]


def test_max_steps_per_epoch_caps_the_optimiser_steps_and_leaves_validation_whole(tiny_paddy, tmp_path):
    # Uncapped, 57 training images at 8 a batch and accum 2 make 3 steps an epoch: the cap of 1 must give 2 in all,
    # each of 2 batches (a cap counted in batches would give 1), and every validation image still predicted.
    cfg = stage_config(accum=2, tta=False, max_steps_per_epoch=1)
    metrics = train.run_stage(cfg, data_dir=tiny_paddy, root=tmp_path)
    assert metrics["optimizer_steps"] == 2
    valid = pd.read_csv(tmp_path / "preds" / cfg.name / "valid.csv")
    table = train.split_table(tiny_paddy, cfg.validation)
    assert len(valid) == table["is_valid"].sum() > 0


# -- faults: stale, damaged and partly written checkpoints, bad decision files, a full disk ------------------------


def fingerprint(cfg, data_dir):
    return train.run_fingerprint(cfg, train.split_table(data_dir, cfg.validation))


def test_the_fingerprint_names_changed_images_precision_code_and_libraries(tiny_paddy, tmp_path, monkeypatch):
    cfg = stage_config()
    saved = fingerprint(cfg, tiny_paddy)
    data = shutil.copytree(tiny_paddy, tmp_path / "paddy")
    image = next((data / "train_images").rglob("*.jpg"))
    image.write_bytes(image.read_bytes() + b"\0")  # new image bytes under the same train.csv
    assert train.fingerprint_changes(saved, fingerprint(cfg, data)) == ["images"]
    fp16 = train.StageConfig(**{**cfg.__dict__, "precision": "fp16"})
    assert train.fingerprint_changes(saved, fingerprint(fp16, tiny_paddy)) == ["precision"]

    project = tmp_path / "project"  # the code: the train stage's deps as dvc.yaml lists them
    shutil.copytree(train.PROJECT_ROOT / "pipeline", project / "pipeline")
    shutil.copy(train.PROJECT_ROOT / "dvc.yaml", project)
    with open(project / "pipeline" / "vision.py", "a") as vision_py:
        vision_py.write("# an edit\n")
    (project / "pipeline" / "ensemble.py").write_text("# not a dep of train\n")
    monkeypatch.setattr(train, "PROJECT_ROOT", project)
    assert train.fingerprint_changes(saved, fingerprint(cfg, tiny_paddy)) == ["code pipeline/vision.py"]
    monkeypatch.undo()

    older_torch = dict(saved)
    older_torch["library torch"] = "2.10.0"
    assert train.fingerprint_changes(older_torch, saved) == ["library torch"]
    assert train.fingerprint_changes("3f2a9c0d1e", saved) == ["the checkpoint format"]  # a string: before this one


def test_a_run_killed_after_epoch_2_then_given_new_images_starts_fresh_and_equals_an_uninterrupted_run(
    tiny_paddy, tmp_path, monkeypatch, capfd
):
    cfg = stage_config(epochs=3, tta=False)
    new_images = shutil.copytree(tiny_paddy, tmp_path / "new_images")
    images = sorted((new_images / "train_images").rglob("*.jpg"))
    for a, b in zip(images[::2], images[1::2]):  # swap the bytes of pairs of images: same ids, labels and train.csv
        a_bytes = a.read_bytes()
        a.write_bytes(b.read_bytes())
        b.write_bytes(a_bytes)
    uninterrupted = train.run_stage(cfg, data_dir=new_images, root=tmp_path / "uninterrupted")
    save = train.Checkpoints.save

    def save_then_die(self, learn, completed_epochs):
        save(self, learn, completed_epochs)
        if completed_epochs == 2:
            raise Killed("killed after epoch 2")

    with monkeypatch.context() as patched:
        patched.setattr(train.Checkpoints, "save", save_then_die)
        with pytest.raises(Killed):
            train.run_stage(cfg, data_dir=tiny_paddy, root=tmp_path / "killed")
    capfd.readouterr()
    rerun = train.run_stage(cfg, data_dir=new_images, root=tmp_path / "killed")

    assert "a checkpoint of another run (images changed); starting fresh" in capfd.readouterr().err
    assert rerun["resumed_from_epoch"] == 0
    expected = torch.load(tmp_path / "uninterrupted" / "models" / "tiny.pth", weights_only=False)["state_dict"]
    actual = torch.load(tmp_path / "killed" / "models" / "tiny.pth", weights_only=False)["state_dict"]
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
    assert rerun["valid_error_rate"] == uninterrupted["valid_error_rate"]


def test_a_kill_after_the_epoch_file_but_before_state_json_moves_on_resumes_the_previous_epoch_whole(
    trained, tiny_paddy, tmp_path, monkeypatch
):
    cfg, metrics, root = trained
    write_json = train.write_json

    def killed_before_state_moves_on(path, payload):
        if path.name == "state.json" and payload.get("completed_epochs") == 2:
            raise Killed("killed between the checkpoint's files")
        write_json(path, payload)

    with monkeypatch.context() as patched:
        patched.setattr(train, "write_json", killed_before_state_moves_on)
        with pytest.raises(Killed):
            train.run_stage(cfg, data_dir=tiny_paddy, root=tmp_path)
    resumed = train.run_stage(cfg, data_dir=tiny_paddy, root=tmp_path)

    assert resumed["resumed_from_epoch"] == 1
    expected = torch.load(root / "models" / f"{cfg.name}.pth", weights_only=False)["state_dict"]
    actual = torch.load(tmp_path / "models" / f"{cfg.name}.pth", weights_only=False)["state_dict"]
    assert all(torch.equal(expected[key], actual[key]) for key in expected)


def damaged_checkpoint(directory, cfg, data_dir, damage: str):
    """A checkpoint of `cfg` after epoch 1 in `directory`, then damaged: truncated epoch file, garbled state or an
    emptied DVCLive params.yaml."""
    checkpoints = train.Checkpoints(directory, fingerprint(cfg, data_dir))
    checkpoints.start(lr=0.01)
    state = train.read_json(directory / "state.json") | dict(completed_epochs=1)
    (directory / "state.json").write_text(train.json_text(state))
    train.save_torch(dict(model={}, opt={}, ranks=[{"a": torch.zeros(1000)}]), checkpoints.epoch_file(1))
    if damage == "truncated epoch file":
        checkpoints.epoch_file(1).write_bytes(checkpoints.epoch_file(1).read_bytes()[:500])
        return checkpoints, checkpoints.epoch_file(1)
    if damage == "empty DVCLive params":  # DVCLive rewrites it in place as the second fit of fine_tune starts
        checkpoints.live_dir.mkdir(parents=True)
        (checkpoints.live_dir / "params.yaml").write_text("")
        return checkpoints, checkpoints.live_dir / "params.yaml"
    (directory / "state.json").write_bytes({"garbage": b"\x80\x03garbage", "a list": b"[1, 2]"}[damage])
    return checkpoints, directory / "state.json"


@pytest.mark.parametrize("damage", ["truncated epoch file", "garbage", "a list", "empty DVCLive params"])
def test_a_damaged_checkpoint_is_one_line_naming_the_file_then_not_resumed(damage, tiny_paddy, tmp_path, capfd):
    checkpoints, damaged = damaged_checkpoint(tmp_path / "tiny", stage_config(), tiny_paddy, damage)
    assert checkpoints.state() is None
    [line] = capfd.readouterr().err.splitlines()
    assert line.startswith(f"[train] {damaged}: unreadable checkpoint (") and line.endswith("training from the start")


def test_a_member_whose_checkpoint_file_is_truncated_trains_from_the_start(tiny_paddy, tmp_path):
    cfg = stage_config(epochs=1, tta=False)
    damaged_checkpoint(tmp_path / "models" / "checkpoints" / "tiny", cfg, tiny_paddy, "truncated epoch file")
    metrics = train.run_stage(cfg, data_dir=tiny_paddy, root=tmp_path)
    assert metrics["resumed_from_epoch"] == 0 and (tmp_path / "models" / "tiny.pth").is_file()


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"\x89PNG\r\n\x1a\n\0\0", "not valid JSON"),
        (b"[4]", "not a JSON object (member, accum, accum_source)"),
        (b'{"member": "tiny", "accum": 0, "accum_source": "probe"}', "accum 0 is not between 1 and the batch size 16"),
        (b'{"member": "tiny", "accum": 64, "accum_source": "probe"}', "accum 64 is not between 1 and the batch size 16"),
    ],
)
def test_a_bad_decision_file_is_one_line_naming_it_and_the_fix(content, problem, project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["members"]["tiny"]["accum"] = None
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    decision = project / vision.probe_decision_path("tiny")
    decision.parent.mkdir(parents=True)
    decision.write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["tiny"])
    assert str(exit_info.value) == f"train: {decision.relative_to(project)}: {problem}; run `dvc repro probe` again"


def test_a_missing_file_deep_inside_a_library_is_raised_as_itself(project, monkeypatch):
    def run_stage_missing_a_library_file(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "timm/pretrained_cfg.json")

    monkeypatch.setattr(train, "run_stage", run_stage_missing_a_library_file)
    with pytest.raises(FileNotFoundError):
        train.main(["tiny"])


class FullDisk(io.RawIOBase):
    """A file on a volume with 1000 bytes free: the next write after them fails as the OS fails it."""

    written = 0

    def writable(self):
        return True

    def write(self, data):
        if self.written + len(data) > 1000:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.written += len(data)
        return len(data)


def test_torch_save_on_a_full_disk_raises_the_writes_enospc_not_torchs_unexpected_pos(monkeypatch):
    monkeypatch.setattr(train, "open", lambda path, mode: FullDisk(), raising=False)
    with pytest.raises(OSError) as err:
        train.save_torch({"weights": torch.zeros(100_000)}, Path("models/tiny.pth"))
    assert err.value.errno == errno.ENOSPC


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_at_a_checkpoint_under_dvc_is_one_line_with_the_path_and_how_to_restore(project, monkeypatch):
    monkeypatch.setattr(torch, "save", disk_full)
    monkeypatch.setenv("DVC_STAGE", "train@tiny")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["tiny"])
    message = str(exit_info.value)
    assert message.startswith("train: models/checkpoints/tiny/epoch_1.pth: no space left on device (")
    assert message.endswith("`dvc checkout train@tiny` brings back the outputs DVC removed before the run")
    assert "\n" not in message and not list((project / "models" / "checkpoints" / "tiny").glob("*.partial"))


@pytest.mark.parametrize("full", ["models/tiny.pth", "preds/tiny", "metrics/train/tiny.json"])
def test_a_full_disk_while_writing_a_members_outputs_leaves_the_previous_ones_all_in_place(
    full, tmp_path, monkeypatch
):
    cfg = stage_config()
    previous = {"models/tiny.pth": b"old weights", "preds/tiny/test.csv": b"old", "metrics/train/tiny.json": b"{}"}
    for name, content in previous.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    live_dir = tmp_path / "models" / "checkpoints" / "tiny" / "dvclive"
    live_dir.mkdir(parents=True)
    writes = {"models/tiny.pth": (torch, "save"), "preds/tiny": (pd.DataFrame, "to_csv")}
    monkeypatch.setattr(*writes.get(full, (Path, "write_text")), disk_full)  # the metrics: the last text written
    frames = (pd.DataFrame({"image_id": ["a"]}), pd.DataFrame({"image_id": ["a"]}))
    weights = train.model_weights(cfg.member, state_dict=torch.nn.Linear(2, 2).state_dict())

    with pytest.raises(NoSpaceError, match=f"^{tmp_path / full}: no space left on device"):
        train.write_outputs(tmp_path, cfg, weights, frames, {"valid_accuracy": 1}, live_dir)

    assert {name: (tmp_path / name).read_bytes() for name in previous} == previous
    assert not (tmp_path / "dvclive").exists() and not list(tmp_path.rglob("*.partial"))


# -- K folds: fold@<member>-<k> trains one fold's model, train@<member> gathers them ---------------------------------


@pytest.fixture(scope="module")
def two_folds(tiny_paddy, tmp_path_factory):
    """Both folds of a 2-fold run trained (one epoch, no TTA), then gathered: (config, gathered metrics, root)."""
    root = tmp_path_factory.mktemp("folds")
    validation = train.ValidationConfig(valid_pct=0.25, seed=0, full=False, folds=2, fold_ids=(0, 1))
    cfg = dataclasses.replace(stage_config(epochs=1, tta=False), validation=validation)
    for fold in validation.fold_ids:
        train.run_stage(dataclasses.replace(cfg, fold=fold), data_dir=tiny_paddy, root=root)
    return cfg, train.gather_folds(cfg, tiny_paddy, root), root


def test_each_fold_model_predicts_its_own_held_out_fold(two_folds, tiny_paddy):
    cfg, _, root = two_folds
    table = train.split_table(tiny_paddy, cfg.validation)
    for fold in (0, 1):
        valid = pd.read_csv(root / "folds" / f"tiny-{fold}" / "valid.csv")
        assert valid["image_id"].tolist() == table.loc[table["fold"] == fold, "image_id"].tolist()
        assert train.read_json(root / "metrics" / "train" / "folds" / f"tiny-{fold}.json")["fold"] == fold
        assert (root / "folds" / f"tiny-{fold}" / "model.pth").is_file()


def test_the_member_is_the_mean_of_its_folds_on_test_and_their_oof_rows_on_train(two_folds, tiny_paddy):
    cfg, metrics, root = two_folds
    folds = [root / "folds" / f"tiny-{fold}" for fold in (0, 1)]
    test = pd.read_csv(root / "preds" / "tiny" / "test.csv")
    fold_tests = [pd.read_csv(where / "test.csv")[list(CLASSES)] for where in folds]
    np.testing.assert_allclose(test[list(CLASSES)], (fold_tests[0] + fold_tests[1]) / 2, atol=1e-6)
    oof = pd.read_csv(root / "preds" / "tiny" / "valid.csv")
    assert oof["image_id"].tolist() == pd.read_csv(tiny_paddy / "train.csv")["image_id"].tolist()
    by_id = pd.concat([pd.read_csv(where / "valid.csv") for where in folds]).set_index("image_id")
    np.testing.assert_allclose(oof.set_index("image_id")[list(CLASSES)], by_id.loc[oof["image_id"], list(CLASSES)])
    assert metrics == train.read_json(root / "metrics" / "train" / "tiny.json")
    assert (metrics["validated_on"], metrics["folds"], set(metrics["fold_accuracy"])) == ("oof", 2, {"0", "1"})
    assert len(torch.load(root / "models" / "tiny.pth", weights_only=True)["folds"]) == 2


def test_a_missing_fold_names_the_stage_to_run(two_folds, tiny_paddy, tmp_path):
    cfg, _, root = two_folds
    shutil.copytree(root / "folds" / "tiny-0", tmp_path / "folds" / "tiny-0")
    with pytest.raises(train.TrainError, match=r"tiny-1/test\.csv: not found; run `dvc repro fold@tiny-1`"):
        train.gather_folds(cfg, tiny_paddy, tmp_path)
