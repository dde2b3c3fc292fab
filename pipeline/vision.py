"""The ensemble member: its DataLoaders and its fastai Learner on a timm architecture (its config: pipeline/members.py).

Shared by `probe` (which trains each member briefly on the smallest class) and `train` (which trains it for real),
so both measure and run exactly the same model, item transform, batch size and augmentation.
"""

from __future__ import annotations

import inspect
import random
from pathlib import Path
from typing import Any, Literal, Mapping

import albumentations
import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.callback.mixup import CutMix, MixUp
from fastai.callback.training import GradientAccumulation
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.metrics import error_rate
from fastai.vision.all import (
    CategoryBlock,
    ColReader,
    ColSplitter,
    DataBlock,
    ImageBlock,
    ItemTransform,
    PadMode,
    PILImage,
    Resize,
    aug_transforms,
    set_seed,
    vision_learner,
)
from fastai.torch_core import get_model
from fastai.vision.learner import TimmBody, create_timm_model
from fastcore.parallel import num_cpus
from timm.layers import Format, nhwc_to
from timm.utils import ModelEmaV3
from torch import nn

from pipeline import members
from pipeline.members import MemberConfig, Size, TrainConfig
from pipeline.torch_setup import compute_device, quiet_progress
from pipeline.paddy import CLASSES, VARIETIES
from pipeline.params import PARAMS_FILE, ParamsError

N_CLASSES = len(CLASSES)
CPU_AUTO_WORKERS = 0  # `num_workers: auto` when training on CPU: see loader_workers and the README's Benchmarks


def check_albumentations_transform(name: str, kwargs: Mapping[str, Any]) -> None:
    """A one-line ValueError unless albumentations has transform `name` and it accepts `kwargs`.

    Built once here, so that a bad argument stops params validation rather than a training run hours later
    (albumentations only warns about an argument it does not know, so those are checked against its signature).
    """
    transform = getattr(albumentations, name, None)
    if not isinstance(transform, type) or not issubclass(transform, albumentations.BasicTransform):
        raise ValueError(f"albumentations has no transform {name!r}; see albumentations' docs")
    unknown = sorted(set(kwargs) - set(inspect.signature(transform).parameters))
    if unknown:
        raise ValueError(f"albumentations.{name} takes no argument {unknown[0]!r}; see its docs")
    try:
        transform(**kwargs)
    except (TypeError, ValueError) as err:
        # pydantic's report: a title line, then the argument and the reason, one per line
        reason = " ".join(line.strip() for line in str(err).splitlines()[1:3]) or str(err)
        raise ValueError(f"albumentations.{name}: {reason}") from None


def load_train_config(params: Mapping[str, Any]) -> TrainConfig:
    """members.load_train_config, and what only timm and albumentations know: every member's arch is a timm model,
    its albumentations transforms exist and take their arguments. Every probe and train loads all members with it
    as it starts, so a typo in any member stops the first of them, before anything is trained."""
    config = members.load_train_config(params)
    for name, member in config.members.items():
        try:
            if not timm.is_model(member.arch):
                raise ValueError(f"arch {member.arch!r} is not a timm model; pick a name from timm.list_models()")
            try:  # whether timm builds the arch for its input size only (vit, swin: position embeddings, windows)
                fixed_size = bool(timm.models.get_pretrained_cfg_value(member.arch, "fixed_input_size"))
            except RuntimeError:  # a deprecated name timm has no config under
                fixed_size = False
            if member.progressive and fixed_size:
                raise ValueError(f"progressive: arch {member.arch!r} is built for one input size; set progressive: null")
            for transform, kwargs in member.albumentations.items():
                check_albumentations_transform(transform, kwargs)
        except ValueError as err:
            raise ParamsError(f"{PARAMS_FILE}: key 'train.members.{name}': {err}") from None
    return config


def batch_size(bs: int, accum: int) -> int:
    """Images per step: the seeds' `bs // accum`, never zero."""
    if accum < 1 or accum > bs:
        raise ValueError(f"accum {accum} must be between 1 and the batch size {bs}")
    return bs // accum


# -- the seeds' multi-target model: 10 disease logits then 10 variety logits ---------------------------------------


def disease_loss(inp, disease, variety):
    return F.cross_entropy(inp[:, :N_CLASSES], disease)


def variety_loss(inp, disease, variety):
    return F.cross_entropy(inp[:, N_CLASSES:], variety)


def disease_err(inp, disease, variety):
    return error_rate(inp[:, :N_CLASSES], disease)


def variety_err(inp, disease, variety):
    return error_rate(inp[:, N_CLASSES:], variety)


def cross_entropy(label_smoothing: float):
    """fastai's flat cross-entropy (its default for a category target), label-smoothed when asked."""
    return LabelSmoothingCrossEntropyFlat(eps=label_smoothing) if label_smoothing else CrossEntropyLossFlat()


class DiseaseVarietyLoss:
    """The seeds' `combine_loss`, as a class so that fastai's get_preds/tta turn logits into per-head probabilities.

    Each head's cross-entropy is fastai's, label-smoothed when asked. `y_int` and `reduction` are what fastai's MixUp
    reads: it then mixes the per-image losses of both targets (NoneReduce), rather than lerping integer labels.
    """

    y_int = True

    def __init__(self, label_smoothing: float = 0.0):
        self.ce = cross_entropy(label_smoothing)

    reduction = property(lambda self: self.ce.reduction, lambda self, value: setattr(self.ce, "reduction", value))

    def __call__(self, inp, disease, variety):
        return self.ce(inp[:, :N_CLASSES], disease) + self.ce(inp[:, N_CLASSES:], variety)

    def activation(self, out):
        return torch.cat([out[:, :N_CLASSES].softmax(dim=1), out[:, N_CLASSES:].softmax(dim=1)], dim=1)

    def decodes(self, out):
        return out[:, :N_CLASSES].argmax(dim=1)


def disease_probs(probs):
    """The disease (label) columns of a model's probabilities, whatever its targets."""
    return probs[:, :N_CLASSES]


# -- data ----------------------------------------------------------------------------------------------------------


def item_transform(member: MemberConfig):
    """fastai's Resize with the member's method; pad pads with zeros, as the seeds do."""
    return Resize(member.resize, method=member.method, pad_mode=PadMode.Zeros)


class AlbumentationsItem(ItemTransform):
    """A member's albumentations pipeline on training items only, like fastai's own random augmentations."""

    split_idx = 0  # the training set only (and fastai's TTA, which applies the training transforms)
    order = 2  # after Resize (order 1): augmenting the resized image is cheaper and the result is the same size

    def __init__(self, transforms: Mapping[str, Mapping[str, Any]]):
        super().__init__()
        self.pipeline = albumentations.Compose(
            [getattr(albumentations, name)(**kwargs) for name, kwargs in transforms.items()]
        )

    def encodes(self, item):
        image, *targets = item
        # albumentations draws from a random state of its own, which every DataLoader worker would inherit
        # unchanged (the same augmentations each epoch, in each worker) and no checkpoint saves. Seeding it from
        # python's random, which fastai seeds per worker and the checkpoints save, keeps runs reproducible.
        self.pipeline.set_random_seed(random.getrandbits(32))
        augmented = self.pipeline(image=np.asarray(image))["image"]
        return (PILImage.create(augmented), *targets)


def member_datablock(member: MemberConfig, size: Size | None = None) -> DataBlock:
    """The DataBlock for a table with `path`, `label`, `variety` and boolean `is_valid` columns; `size`: a
    progressive phase's batch size instead of the member's."""
    multi = member.targets == "label+variety"
    blocks = (ImageBlock, CategoryBlock(vocab=list(CLASSES))) + ((CategoryBlock(vocab=list(VARIETIES)),) if multi else ())
    get_y = [ColReader("label"), ColReader("variety")] if multi else ColReader("label")
    augment = [AlbumentationsItem(member.albumentations)] if member.albumentations else []
    return DataBlock(
        blocks=blocks, n_inp=1, get_x=ColReader("path"), get_y=get_y, splitter=ColSplitter("is_valid"),
        item_tfms=augment + [item_transform(member)],
        batch_tfms=aug_transforms(size=size or member.size, min_scale=member.min_scale),
    )


def loader_workers(requested: int | Literal["auto"], device: torch.device) -> int:
    """DataLoader worker processes: `requested`, or for `auto` every CPU this process may run on when training on
    CUDA (decoding and resizing full-size JPEGs is what a GPU waits for) and CPU_AUTO_WORKERS on CPU, where workers
    take cores from the training itself.
    """
    if requested != "auto":
        return requested
    return num_cpus() if device.type == "cuda" else CPU_AUTO_WORKERS


def member_dataloaders(
    member: MemberConfig, table: pd.DataFrame, bs: int, accum: int, seed: int | None, num_workers: int | str = 0,
    size: Size | None = None,
):
    """DataLoaders with `bs // accum` images per step (the seeds' memory trick), seeded shuffling (seed None: drawn
    from the random state, as a progressive phase's loaders are), batches of `size` (None: the member's),
    `num_workers` processes (or `auto`: loader_workers), pinned memory on CUDA.

    No `persistent_workers`: fastai 2.8 starts new workers every epoch whatever it says, each seeded from the main
    process's torch random state, which the checkpoints save: so a resumed run matches an uninterrupted one with
    the same seed and worker count (not across counts: item augmentations are drawn in the workers).
    """
    device = compute_device()
    if seed is not None:
        set_seed(seed, reproducible=True)
    return member_datablock(member, size).dataloaders(
        table,
        bs=batch_size(bs, accum),
        num_workers=loader_workers(num_workers, device),
        pin_memory=device.type == "cuda",
        device=device,
    )


# -- the network and the learner -----------------------------------------------------------------------------------


class ChannelsFirstTimmBody(TimmBody):
    """fastai's TimmBody for a timm model whose features come out channels-last (timm's `output_fmt` NHWC: swin,
    swinv2, ...): fastai's head pools dims 2 and 3 as H and W, so the features are handed to it as NCHW."""

    def forward(self, x):
        return nhwc_to(super().forward(x), Format.NCHW)


def with_channels_first_body(network: nn.Sequential) -> nn.Sequential:
    """fastai's (body, head) network on a timm model, its body swapped for one that hands the head NCHW features
    when the model's own come out channels-last. The timm model (and so its weights and their names) is kept."""
    body = network[0]
    if body.needs_pool and Format(getattr(body.model, "output_fmt", Format.NCHW)) is Format.NHWC:
        network[0] = ChannelsFirstTimmBody(body.model)
    return network


def timm_overlay(member: MemberConfig) -> dict:
    """What timm's pretrained config is told about the member (timm's `pretrained_cfg_overlay`).

    - input_size: the member's `size`: fixed-size models (vit, swin) are built for it (their `img_size`) and timm
      resamples their pretrained position embeddings to it; other models ignore it.
    - file: a local weights file (a PyTorch state dict), for Kaggle kernels without internet; custom_load=False,
      because some registry weights (vit's augreg: JAX .npz) set custom_load, which timm <= 1.0.30 keeps for a
      file too and reads the .pth with its .npz loader.
    """
    overlay: dict[str, Any] = dict(input_size=(3, *members.sides(member.size)))
    if isinstance(member.pretrained, str):
        overlay |= dict(file=str(Path(member.pretrained).resolve()), custom_load=False)
    return overlay


def member_network(member: MemberConfig) -> nn.Sequential:
    """The member's network as member_learner builds it (timm body, fastai head, its weights), without a Learner."""
    network, _ = create_timm_model(
        member.arch, member.n_out, pretrained=bool(member.pretrained), pretrained_cfg_overlay=timm_overlay(member)
    )
    return with_channels_first_body(network)


def precision_for(requested: str, cuda: bool) -> str:
    """The precision a learner trains in for a TrainConfig.precision: fp32 on CPU whatever was asked; on CUDA fp16
    unless bf16/fp32 is asked."""
    if not cuda or requested == "fp32":
        return "fp32"
    return "bf16" if requested == "bf16" else "fp16"


class EmaWeights(Callback):
    """timm's ModelEmaV3 of the weights, with its warmup (the average starts at the weights and its decay grows to
    `decay`), updated after each optimiser step of a fit but lr_find's (whose steps are undone). train checkpoints
    it (state, load_state), and predicts with and saves it (use_averaged): as fastai names callbacks on their learner,
    `learn.ema_weights`."""

    def __init__(self, decay: float):
        self.decay, self.steps, self.skipped = decay, 0, False

    def after_create(self):  # the average starts at the learner's weights (a resumed run's is loaded: load_state)
        self.ema = ModelEmaV3(get_model(self.learn.model), decay=self.decay, use_warmup=True)

    def before_fit(self):
        self.run = not hasattr(self.learn, "lr_finder")
        if self.run:  # where the fit put the model (the average was made where the learner's model was: the CPU)
            self.ema.module.to(next(get_model(self.learn.model).parameters()).device)

    def before_batch(self):
        self.skipped = False

    def after_cancel_step(self):
        self.skipped = True  # fp16's GradScaler skipped this step (GradientAccumulation cancels the whole batch)

    def after_step(self):
        if not self.skipped:
            self.steps += 1
            self.ema.update(get_model(self.learn.model), step=self.steps)

    def state(self) -> dict:
        return dict(steps=self.steps, weights=self.ema.module.state_dict())

    def load_state(self, state: dict) -> None:
        self.steps = state["steps"]
        self.ema.module.load_state_dict(state["weights"])

    def use_averaged(self) -> None:
        get_model(self.learn.model).load_state_dict(self.ema.module.state_dict())


class TargetsMixUp(MixUp):
    """fastai's MixUp, which reads the batch size from `y`: a tuple of both targets for label+variety (the loss
    then mixes both, see DiseaseVarietyLoss), so it is given the first."""

    y = property(lambda self: self.learn.yb[0])


def trick_callbacks(member: MemberConfig) -> list[Callback]:
    """The member's MixUp or CutMix (fastai's) and EmaWeights, each only when set."""
    tricks = ((member.mixup, TargetsMixUp), (member.cutmix, CutMix), (member.ema, EmaWeights))
    return [cb(setting) for setting, cb in tricks if setting]


def member_learner(member: MemberConfig, dls, bs: int, accum: int, mixed_precision: str = "auto"):
    """A fastai Learner on the member's timm architecture, with GradientAccumulation(bs), its tricks, and the
    precision precision_for chooses for `mixed_precision`."""
    if member.targets == "label+variety":
        loss = DiseaseVarietyLoss(member.label_smoothing)
        metrics = [disease_err, variety_err, disease_loss, variety_loss]
    else:
        loss, metrics = cross_entropy(member.label_smoothing), [error_rate]
    learn = vision_learner(
        dls, member.arch, n_out=member.n_out, pretrained=bool(member.pretrained), loss_func=loss, metrics=metrics,
        # GradientAccumulation(bs) steps the optimiser once `bs` images have been seen, whatever the step size.
        cbs=([GradientAccumulation(bs)] if accum > 1 else []) + trick_callbacks(member),
        pretrained_cfg_overlay=timm_overlay(member),
    )
    with_channels_first_body(learn.model)
    precision = precision_for(mixed_precision, torch.cuda.is_available())
    if precision != "fp32":
        getattr(learn, f"to_{precision}")()  # fastai's to_fp16 or to_bf16
    quiet_progress(learn)
    return learn


# -- gradient accumulation: the probe's choice, and which accum train uses -----------------------------------------


def choose_accum(peaks: Mapping[int, float | None], budget_gib: float) -> int | None:
    """The smallest accum whose measured peak memory fits `budget_gib` (None: that run ran out of memory); None when
    none does."""
    return min((accum for accum, peak in peaks.items() if peak is not None and peak <= budget_gib), default=None)


def probe_decision_path(member_name: str) -> Path:
    """The probe's decision for a member, the only probe output train reads (and depends on in dvc.yaml): {"member",
    "accum": int or null, "accum_source": "probe" | "params" | null}, nothing measured, so that a re-probe with the
    same outcome leaves it byte-identical and DVC retrains nothing."""
    return Path("metrics/probe") / f"{member_name}.accum.json"


def accum_to_use(member: MemberConfig, decision: Mapping[str, Any]) -> tuple[int, str]:
    """The accum a member trains with and where it comes from: its explicit `accum` in params, else the probe's
    `decision` (probe_decision_path's, as a dict)."""
    if member.accum is not None:
        return member.accum, "params"
    if decision.get("accum") is None:
        raise ValueError(
            f"the probe of member {decision.get('member')!r} chose no accum (none fitted its budget); "
            "set the member's accum in params.yaml or rerun the probe"
        )
    if decision.get("accum_source") != "probe":
        raise ValueError(
            f"the probe of member {decision.get('member')!r} used the member's accum from params, which is now unset; "
            "rerun the probe"
        )
    return int(decision["accum"]), "probe"
