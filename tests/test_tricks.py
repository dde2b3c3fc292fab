"""A member's training tricks (label smoothing, MixUp, CutMix, EMA, progressive resizing): each is really on when
set, checked in params, and a run using them that is killed and resumed ends exactly as an uninterrupted one."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.mixup import CutMix
from fastai.layers import NoneReduce
from fastai.losses import LabelSmoothingCrossEntropyFlat

from pipeline import train, vision
from pipeline.params import ParamsError, from_mapping
from pipeline.vision import MemberConfig
from test_train import Killed, stage_config

TRICKS = dict(
    targets="label+variety", schedule="fine_tune", epochs=3, progressive=(24, 32), ema=0.9, mixup=0.4,
    label_smoothing=0.1,
)  # fine_tune's phases: the frozen epoch and 1 unfrozen at 24 px, 2 unfrozen at 32 px


def member(**changes) -> MemberConfig:
    return from_mapping(MemberConfig, dict(arch="resnet10t", size=64, epochs=4) | changes, "train.members.m")


@pytest.mark.parametrize("changes, problem", [
    (dict(label_smoothing=1.0), r"\.label_smoothing' is 1.0; use a number in \[0, 1\)"),
    (dict(mixup=-0.4), r"\.mixup' is -0.4; use a positive alpha, or 0 for none"),
    (dict(mixup=0.4, cutmix=1.0), r"\.cutmix' and mixup are both set; set one of them"),
    (dict(cutmix=1.0, targets="label+variety"), r"\.cutmix' does not mix the variety target"),
    (dict(ema=1), r"\.ema' is 1; use a decay in \(0, 1\)"),
    (dict(progressive=[32, 48]), r"\.progressive' is \[32, 48\]; end it with the member's size 64"),
    (dict(progressive=[[32, 80], 64]), r"\.progressive' is \[\[32, 80\], 64\]; no phase's size may exceed the"),
    (dict(progressive=[48, 48, 64]), r"\.progressive' is \[48, 48, 64\]; a phase has the size of the one"),
    (dict(progressive=[16, 32, 48, 56, 64]), r"\.progressive' has 5 phases, more than epochs 4"),
    (dict(progressive=[4, 64]), r"\.progressive\[0\]' is 4; use at least 8 pixels a side"),
])
def test_a_bad_trick_value_is_one_line_naming_the_key_and_the_fix(changes, problem):
    with pytest.raises(ParamsError, match=rf"^params.yaml: key 'train.members.m{problem}") as caught:
        member(**changes)
    assert "\n" not in str(caught.value)


def test_progressive_resizing_is_refused_for_an_arch_built_for_one_input_size():
    vit = dict(arch="vit_tiny_patch16_224", size=224, progressive=[160, 224])
    params = {"train": {"bs": 8, "members": {"vit": vit}}}
    with pytest.raises(ParamsError, match=r"'train.members.vit': progressive: arch 'vit_tiny_patch16_224' is built"):
        vision.load_train_config(params)


def test_progressive_phases_split_the_epochs_evenly_the_later_phases_taking_the_rest():
    phases = train.schedule_phases(member(progressive=[32, 48, 64], epochs=5, schedule="fit_one_cycle"), 0.01)
    assert [(phase.epochs, phase.size, phase.lr) for phase in phases] == [(1, 32, 0.01), (2, 48, 0.01), (2, 64, 0.01)]
    fine_tune = train.schedule_phases(member(progressive=[32, 64], epochs=4), 0.01)
    assert [(p.frozen, p.epochs, p.size) for p in fine_tune] == [(True, 1, 32), (False, 2, 32), (False, 2, 64)]
    assert [phase.size for phase in train.schedule_phases(member(), 0.01)] == [None, None]  # the member's size


def learner(tiny_paddy, **changes):
    cfg = stage_config(**changes)
    table = train.split_table(tiny_paddy, cfg.validation)
    dls = vision.member_dataloaders(cfg.member, table, cfg.bs, 1, 0)
    return vision.member_learner(cfg.member, dls, cfg.bs, 1)


def test_label_smoothing_is_fastais_loss_on_each_target(tiny_paddy):
    assert learner(tiny_paddy).loss_func.__class__.__name__ == "CrossEntropyLossFlat"
    smoothed = learner(tiny_paddy, label_smoothing=0.2).loss_func
    assert isinstance(smoothed, LabelSmoothingCrossEntropyFlat) and smoothed.func.eps == 0.2
    multi = learner(tiny_paddy, label_smoothing=0.2, targets="label+variety").loss_func
    logits, disease, variety = torch.randn(4, 20), torch.tensor([0, 1, 2, 9]), torch.tensor([9, 8, 1, 0])
    expected = F.cross_entropy(logits[:, :10], disease, label_smoothing=0.2) + F.cross_entropy(
        logits[:, 10:], variety, label_smoothing=0.2
    )
    assert torch.allclose(multi(logits, disease, variety), expected)


def test_mixup_mixes_both_targets_losses_image_by_image():
    """fastai's MixUp mixes per-image losses (NoneReduce) when the loss says its targets are integers (y_int)."""
    loss, logits = vision.DiseaseVarietyLoss(), torch.randn(4, 20)
    disease, variety = torch.tensor([0, 1, 2, 9]), torch.tensor([9, 8, 1, 0])
    with NoneReduce(loss) as per_image:
        losses = per_image(logits, disease, variety)
    expected = F.cross_entropy(logits[:, :10], disease, reduction="none") + F.cross_entropy(
        logits[:, 10:], variety, reduction="none"
    )
    assert loss.y_int and torch.allclose(losses, expected) and loss.reduction == "mean"


@pytest.mark.parametrize("trick, callback", [
    (dict(mixup=0.4), vision.TargetsMixUp), (dict(cutmix=1.0), CutMix), (dict(ema=0.99), vision.EmaWeights)
])
def test_each_trick_is_its_callback_on_the_learner(tiny_paddy, trick, callback):
    tricks = (vision.TargetsMixUp, CutMix, vision.EmaWeights)
    cbs = [cb for cb in learner(tiny_paddy, **trick).cbs if isinstance(cb, tricks)]
    assert [type(cb) for cb in cbs] == [callback]
    if callback is vision.EmaWeights:
        assert cbs[0].decay == 0.99
    else:
        assert float(cbs[0].distrib.concentration1) == pytest.approx(next(iter(trick.values())))


def test_every_trick_is_in_the_fingerprint(tiny_paddy):
    table = train.split_table(tiny_paddy, stage_config().validation)
    config = train.run_fingerprint(stage_config(), table)["config"]
    changes = dict(label_smoothing=0.1, mixup=0.4, cutmix=0.4, ema=0.99, progressive=(24, 32))
    for key, value in changes.items():
        assert train.run_fingerprint(stage_config(**{key: value}), table)["config"] != config, key


class BatchSizes(Callback):
    """The image size of each training epoch's first batch."""

    def __init__(self, sizes: list):
        self.sizes = sizes

    def before_batch(self):
        if self.training and self.iter == 0:
            self.sizes.append(tuple(self.x.shape[-2:]))


@pytest.fixture(scope="module")
def tricked(tiny_paddy, tmp_path_factory):
    """One uninterrupted run with every trick on (config, metrics, root, each epoch's image size)."""
    root, cfg, sizes = tmp_path_factory.mktemp("tricked"), stage_config(**TRICKS), []
    epoch_callbacks = train.epoch_callbacks
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(train, "epoch_callbacks", lambda *args: epoch_callbacks(*args) + [BatchSizes(sizes)])
        metrics = train.run_stage(cfg, data_dir=tiny_paddy, root=root)
    return cfg, metrics, root, sizes


def test_progressive_phases_train_at_their_sizes(tricked):
    assert tricked[3] == [(24, 24), (24, 24), (32, 32), (32, 32)]
    assert tricked[1]["valid_variety_error_rate"] is not None  # MixUp gave the multi-target loss back


def test_a_run_with_every_trick_killed_at_a_resize_mid_phase_and_before_predicting_ends_as_the_uninterrupted_one(
    tricked, tiny_paddy, tmp_path, monkeypatch
):
    cfg, metrics, root, _ = tricked
    save, kill_after = train.Checkpoints.save, []

    def save_then_die(self, learn, completed_epochs):
        save(self, learn, completed_epochs)
        if completed_epochs == kill_after[0]:
            raise Killed(f"killed after epoch {completed_epochs}")

    monkeypatch.setattr(train.Checkpoints, "save", save_then_die)
    for epoch in (2, 3, 4):  # before the resize to 32 px, inside the 32 px phase, after the last epoch
        kill_after[:] = [epoch]
        with pytest.raises(Killed):
            train.run_stage(cfg, data_dir=tiny_paddy, root=tmp_path)
    checkpoint = torch.load(tmp_path / "models" / "checkpoints" / cfg.name / "epoch_4.pth", weights_only=False)
    resumed = train.run_stage(cfg, data_dir=tiny_paddy, root=tmp_path)

    assert resumed["resumed_from_epoch"] == 4
    saved = torch.load(tmp_path / "models" / f"{cfg.name}.pth", weights_only=False)["state_dict"]
    ema, raw = checkpoint["ema"]["weights"], checkpoint["model"]
    assert all(torch.equal(saved[key], ema[key]) for key in saved)  # the average is what is saved
    assert not all(torch.equal(raw[key], ema[key]) for key in raw if raw[key].is_floating_point())
    expected = torch.load(root / "models" / f"{cfg.name}.pth", weights_only=False)["state_dict"]
    assert all(torch.equal(expected[key], saved[key]) for key in expected)
    for preds in ("test.csv", "valid.csv"):
        assert (tmp_path / "preds" / cfg.name / preds).read_bytes() == (root / "preds" / cfg.name / preds).read_bytes()
    assert resumed["valid_error_rate"] == metrics["valid_error_rate"]
