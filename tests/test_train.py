"""train@<member>: outputs in the ensemble's contract, resume after a kill, OOM fallback, local pretrained weights."""

from __future__ import annotations

import socket

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import train, vision
from pipeline import paddy
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


def test_out_of_memory_at_accum_equal_to_bs_is_raised(tiny_paddy, tmp_path, monkeypatch):
    def always_out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(train, "fit_member", always_out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        train.run_stage(stage_config(epochs=1, accum=8), data_dir=tiny_paddy, root=tmp_path)


def test_full_training_writes_header_only_validation_predictions(tiny_paddy, tmp_path):
    cfg = stage_config(epochs=1, full=True, tta=False)
    metrics = train.run_stage(cfg, data_dir=tiny_paddy, root=tmp_path)
    valid = pd.read_csv(tmp_path / "preds" / cfg.name / "valid.csv")
    assert list(valid.columns) == ["image_id", "label", *CLASSES] and valid.empty
    assert metrics["valid_error_rate"] is None and metrics["train_images"] == len(pd.read_csv(tiny_paddy / "train.csv"))


def test_accum_comes_from_the_probe_unless_params_set_it(tmp_path):
    probe = tmp_path / "probe.json"
    probe.write_text('{"member": "tiny", "chosen_accum": 4, "accum": 4, "accum_source": "probe"}')
    assert train.member_accum(MemberConfig(**TINY_MEMBER), probe) == (4, "probe")
    assert train.member_accum(MemberConfig(**TINY_MEMBER, accum=2), probe) == (2, "params")
    with pytest.raises(FileNotFoundError, match="dvc repro probe"):
        train.member_accum(MemberConfig(**TINY_MEMBER), tmp_path / "missing.json")


def test_fine_tune_is_one_frozen_epoch_then_the_unfrozen_epochs_at_half_the_lr():
    frozen, unfrozen = train.schedule_phases(MemberConfig(**(TINY_MEMBER | dict(schedule="fine_tune", epochs=3))), 0.01)
    assert (frozen.frozen, frozen.epochs, frozen.lr) == (True, 1, slice(0.01))
    assert (unfrozen.frozen, unfrozen.epochs, unfrozen.lr) == (False, 3, slice(0.005 / 100, 0.005))


def test_local_pretrained_weights_load_without_network(tiny_paddy, tmp_path, monkeypatch):
    import timm

    weights = tmp_path / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), weights)
    saved = torch.load(weights)

    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    member = MemberConfig(**(TINY_MEMBER | dict(pretrained=str(weights), schedule="fine_tune")))
    table = train.split_table(tiny_paddy, train.ValidationConfig(valid_pct=0.25, seed=0))
    dls = vision.member_dataloaders(member, table, bs=16, accum=1, seed=0)
    body = vision.member_learner(member, dls, bs=16, accum=1).model[0]
    loaded = body.state_dict()  # fastai's TimmBody wraps timm's model, created without its head (fc)
    body_keys = [key for key in saved if not key.startswith("fc.")]
    assert sorted(loaded) == sorted(f"model.{key}" for key in body_keys)
    assert all(torch.equal(loaded[f"model.{key}"], saved[key]) for key in body_keys)
