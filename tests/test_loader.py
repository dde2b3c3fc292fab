"""The member's DataLoaders: worker processes, reproducibility with workers, and item-level albumentations."""

from __future__ import annotations

import os

import pandas as pd
import pytest
import torch

from pipeline import train, vision
from pipeline.paddy import read_train_table
from pipeline.params import ParamsError
from pipeline.vision import MemberConfig

# Random crops (Resize's `crop` on training items) and an albumentations transform are drawn in the workers, so a
# worker seeded differently from one run to the next would change the weights.
AUGMENTED_MEMBER = dict(
    arch="resnet10t",
    resize=40,
    method="crop",
    size=32,
    epochs=2,
    lr=0.01,
    schedule="fit_one_cycle",
    accum=1,
    albumentations={"GaussNoise": {"p": 0.5}},
)


def stage_config(num_workers) -> train.StageConfig:
    return train.StageConfig(
        profile="demo",
        seed=0,
        name="augmented",
        member=MemberConfig(**AUGMENTED_MEMBER),
        bs=16,
        tta=False,
        validation=train.ValidationConfig(valid_pct=0.25, seed=0, full=False),
        num_workers=num_workers,
    )


def weights(root) -> dict:
    return torch.load(root / "models" / "augmented.pth", weights_only=False)["state_dict"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


@pytest.fixture(scope="module")
def one_worker_run(tiny_paddy, tmp_path_factory):
    root = tmp_path_factory.mktemp("one_worker")
    return train.run_stage(stage_config(num_workers=1), data_dir=tiny_paddy, root=root), root


def test_two_runs_with_one_worker_give_identical_weights(one_worker_run, tiny_paddy, tmp_path):
    metrics, root = one_worker_run
    again = train.run_stage(stage_config(num_workers=1), data_dir=tiny_paddy, root=tmp_path)
    assert metrics["num_workers"] == again["num_workers"] == 1
    assert same_weights(weights(root), weights(tmp_path))


class Killed(Exception):
    """Stands in for a kill after a checkpoint is on disk."""


def test_a_run_killed_and_resumed_with_one_worker_matches_the_uninterrupted_run(
    one_worker_run, tiny_paddy, tmp_path, monkeypatch
):
    """fastai starts new workers every epoch, seeded from the main process's random state, which checkpoints save."""
    _, root = one_worker_run
    save = train.Checkpoints.save

    def save_then_die(self, learn, completed_epochs):
        save(self, learn, completed_epochs)
        raise Killed(f"killed after epoch {completed_epochs}")

    monkeypatch.setattr(train.Checkpoints, "save", save_then_die)
    with pytest.raises(Killed):
        train.run_stage(stage_config(num_workers=1), data_dir=tiny_paddy, root=tmp_path)
    monkeypatch.setattr(train.Checkpoints, "save", save)
    resumed = train.run_stage(stage_config(num_workers=1), data_dir=tiny_paddy, root=tmp_path)

    assert resumed["resumed_from_epoch"] == 1
    assert same_weights(weights(root), weights(tmp_path))


def test_auto_workers_on_a_gpu_are_the_cpus_this_process_may_run_on(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 5, 7})
    assert vision.loader_workers("auto", torch.device("cuda")) == 3
    assert vision.loader_workers("auto", torch.device("cpu")) == vision.CPU_AUTO_WORKERS
    assert vision.loader_workers(5, torch.device("cuda")) == 5


def test_a_negative_worker_count_is_a_params_error():
    params = {"train": {"bs": 8, "num_workers": -1, "members": {"m": {"arch": "resnet10t"}}}}
    with pytest.raises(ParamsError, match="train.*num_workers"):
        vision.load_train_config(params)


@pytest.fixture(scope="module")
def one_image_twice(tiny_paddy):
    """The same image once as a training item and once as a validation item."""
    row = read_train_table(tiny_paddy).head(1)
    return pd.concat([row.assign(is_valid=False), row.assign(is_valid=True)], ignore_index=True)


def items(member: MemberConfig, table) -> tuple[torch.Tensor, torch.Tensor]:
    """(training item, validation item) images after the item transforms, before the batch transforms."""
    dls = vision.member_dataloaders(member, table, bs=1, accum=1, seed=0)
    for dl in dls.train, dls.valid:
        dl.before_iter()  # where fastai tells the item transforms which split (training or validation) they run on
    return dls.train.do_item(0)[0], dls.valid.do_item(0)[0]


def test_albumentations_change_training_items_and_leave_validation_items_untouched(one_image_twice):
    plain = dict(arch="resnet10t", resize=40, method="squish", size=32)
    plain_train, plain_valid = items(MemberConfig(**plain), one_image_twice)
    augmented = MemberConfig(**plain, albumentations={"ChannelShuffle": {"p": 1.0}, "GaussNoise": {"p": 1.0}})
    augmented_train, augmented_valid = items(augmented, one_image_twice)

    assert augmented_train.shape == plain_train.shape
    assert not torch.equal(augmented_train, plain_train)
    assert torch.equal(augmented_valid, plain_valid)


@pytest.mark.parametrize(
    "transforms, error",
    [
        ({"NoSuchTransform": {}}, "has no transform 'NoSuchTransform'"),
        ({"ImageCompression": {"qualty_range": [50, 95]}}, "takes no argument 'qualty_range'"),
        ({"ImageCompression": {"quality_range": [50, 195]}}, "ImageCompression: quality_range"),
    ],
)
def test_a_bad_albumentations_transform_is_a_one_line_params_error(transforms, error):
    params = {"train": {"bs": 8, "members": {"m": {"arch": "resnet10t", "albumentations": transforms}}}}
    with pytest.raises(ParamsError, match=error) as raised:
        vision.load_train_config(params)
    assert "\n" not in str(raised.value)
