"""The ensemble member: its config, its DataLoaders and its fastai Learner on a timm architecture.

Shared by `probe` (which trains each member briefly on the smallest class) and `train` (which trains it for real),
so both measure and run exactly the same model, item transform, batch size and augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import albumentations
import numpy as np
import pandas as pd
import timm
import torch
import torch.nn.functional as F
from fastai.callback.training import GradientAccumulation
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

from pipeline.common import compute_device, quiet_progress
from pipeline.paddy import CLASSES, VARIETIES
from pipeline.params import PARAMS_FILE, ParamsError, from_mapping, known_values, section_of

Size = int | tuple[int, int]
N_CLASSES = len(CLASSES)


@dataclass(frozen=True)
class MemberConfig:
    """One ensemble member (a `train.members.<name>` entry of params.yaml)."""

    arch: str  # a timm model name: the registry is timm's, not ours
    pretrained: bool | str = False  # false | true (timm hub weights) | path to a local weights file
    resize: Size = 480  # item transform size; a pair is (height, width), as fastai's Resize takes it
    method: Literal["squish", "pad", "crop"] = "squish"
    size: Size = 224  # batch transform (aug_transforms) size; a pair is (height, width)
    targets: Literal["label", "label+variety"] = "label"
    epochs: int = 12
    lr: float | Literal["find"] = 0.01
    schedule: Literal["fine_tune", "fit_one_cycle"] = "fine_tune"
    accum: int | None = None  # None: the probe's choice
    min_scale: float = 0.75
    # Item-level augmentation with albumentations, applied to training items only: {TransformName: {kwargs}}.
    albumentations: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self):
        if not timm.is_model(self.arch):
            raise ValueError(f"arch {self.arch!r} is not a timm model; pick a name from timm.list_models()")
        for name, value in (("resize", self.resize), ("size", self.size)):
            sides = value if isinstance(value, tuple) else (value,)
            if any(side < 8 for side in sides):
                raise ValueError(f"{name} {value!r} is too small; use at least 8 pixels a side")
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.accum is not None and self.accum < 1:
            raise ValueError(f"accum must be null or a positive integer, got {self.accum}")
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"min_scale must be in (0, 1], got {self.min_scale}")
        if isinstance(self.lr, float) and not 0 < self.lr < 10:
            raise ValueError(f"lr must be a positive number below 10 or 'find', got {self.lr}")
        if isinstance(self.pretrained, str) and not Path(self.pretrained).is_file():
            raise ValueError(f"pretrained weights file {self.pretrained!r} not found; fix the path or use true/false")
        if self.albumentations:
            unknown = [name for name in self.albumentations if not hasattr(albumentations, name)]
            if unknown:
                raise ValueError(f"albumentations has no transform {unknown[0]!r}; see albumentations' docs")

    @property
    def n_out(self) -> int:
        return N_CLASSES + (len(VARIETIES) if self.targets == "label+variety" else 0)


@dataclass(frozen=True)
class TrainConfig:
    """The `train` section: settings shared by all members, and the members themselves."""

    bs: int
    members: dict[str, MemberConfig]
    member_defaults: dict[str, Any] = field(default_factory=dict)  # already merged into `members` by the loader
    tta: bool = True
    # auto: fp16 on CUDA (the seeds' to_fp16), fp32 on CPU; bf16 suits GPUs that have it (Ampere and later).
    precision: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    # auto: one process per visible GPU (DDP when more than one), one on a CPU; a count > 1 on a CPU runs gloo.
    devices: int | Literal["auto"] = "auto"

    def __post_init__(self):
        if self.bs < 1:
            raise ValueError(f"bs must be a positive integer, got {self.bs}")
        if self.devices != "auto" and self.devices < 1:
            raise ValueError(f"devices must be auto or a positive count, got {self.devices}")
        if not self.members:
            raise ValueError("members is empty; define at least one ensemble member")

    def member(self, name: str) -> MemberConfig:
        if name not in self.members:
            raise ParamsError(
                f"params.yaml: no member {name!r} under train.members; use one of: {', '.join(self.members)}"
            )
        return self.members[name]


def load_train_config(params: Mapping[str, Any]) -> TrainConfig:
    """The `train` section, `train.member_defaults` merged into every member (a member's own keys win)."""
    raw = section_of(params, "train")
    if not isinstance(raw, Mapping) or not isinstance(raw.get("members"), Mapping):
        return from_mapping(TrainConfig, raw, "train")  # its error names what is wrong
    defaults = raw.get("member_defaults", {})
    known_values(MemberConfig, defaults, "train.member_defaults")  # a bad default is named where it is written
    members = {
        name: {**defaults, **member} if isinstance(member, Mapping) else member for name, member in raw["members"].items()
    }
    config = from_mapping(TrainConfig, {**raw, "members": members}, "train")
    for name, member in config.members.items():
        if member.accum is not None and member.accum > config.bs:
            where = f"members.{name}" if "accum" in raw["members"][name] else "member_defaults"
            raise ParamsError(
                f"{PARAMS_FILE}: key 'train.{where}.accum' is {member.accum}, more than train.bs {config.bs}; "
                "use an accum <= bs, or null for the probe's choice"
            )
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


class DiseaseVarietyLoss:
    """The seeds' `combine_loss`, as a class so that fastai's get_preds/tta turn logits into per-head probabilities."""

    def __call__(self, inp, disease, variety):
        return disease_loss(inp, disease, variety) + variety_loss(inp, disease, variety)

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


def albumentations_transform(member: MemberConfig):
    """An fastai ItemTransform running the member's albumentations pipeline on training items only (or None)."""
    if not member.albumentations:
        return None
    pipeline = albumentations.Compose(
        [getattr(albumentations, name)(**kwargs) for name, kwargs in member.albumentations.items()]
    )

    class AlbumentationsItem(ItemTransform):
        split_idx = 0  # training set only, like fastai's own random augmentations
        order = 2  # after Resize (order 1): augmenting the resized image is cheaper and the result is the same size

        def encodes(self, item):
            image, *targets = item
            augmented = pipeline(image=np.array(image))["image"]
            return (PILImage.create(augmented), *targets)

    return AlbumentationsItem()


def member_datablock(member: MemberConfig):
    """The DataBlock for a table with `path`, `label`, `variety` and boolean `is_valid` columns."""
    multi = member.targets == "label+variety"
    blocks = (ImageBlock, CategoryBlock(vocab=list(CLASSES))) + ((CategoryBlock(vocab=list(VARIETIES)),) if multi else ())
    get_y = [ColReader("label"), ColReader("variety")] if multi else ColReader("label")
    item_tfms = [t for t in (albumentations_transform(member), item_transform(member)) if t is not None]
    return DataBlock(
        blocks=blocks,
        n_inp=1,
        get_x=ColReader("path"),
        get_y=get_y,
        splitter=ColSplitter("is_valid"),
        item_tfms=item_tfms,
        batch_tfms=aug_transforms(size=member.size, min_scale=member.min_scale),
    )


def member_dataloaders(member: MemberConfig, table: pd.DataFrame, bs: int, accum: int, seed: int, num_workers: int = 0):
    """DataLoaders with `bs // accum` images per step (the seeds' memory trick), seeded shuffling."""
    set_seed(seed, reproducible=True)
    return member_datablock(member).dataloaders(
        table, bs=batch_size(bs, accum), num_workers=num_workers, device=compute_device()
    )


# -- the learner ---------------------------------------------------------------------------------------------------


def precision_for(requested: bool | str | None, cuda: bool) -> str:
    """The precision a learner trains in: fp32 on CPU whatever was asked; on CUDA fp16 unless bf16/fp32 is asked.

    `requested` is a TrainConfig.precision, or a bool (True: fp16, False: fp32), or None (auto).
    """
    if not cuda or requested is False or requested == "fp32":
        return "fp32"
    return "bf16" if requested == "bf16" else "fp16"


def member_learner(member: MemberConfig, dls, bs: int, accum: int, mixed_precision: bool | str | None = None):
    """A fastai Learner on the member's timm architecture, with GradientAccumulation(bs) and, on CUDA, fp16.

    `mixed_precision`: None or "auto" (fp16 on CUDA), True/"fp16", "bf16", False/"fp32"; always fp32 on CPU.

    Local weights files go through timm's own offline mechanism (`pretrained_cfg_overlay=dict(file=...)`), the way
    Kaggle kernels without internet load them.
    """
    timm_kwargs = {}
    if isinstance(member.pretrained, str):
        timm_kwargs["pretrained_cfg_overlay"] = dict(file=str(Path(member.pretrained).resolve()))
    if member.targets == "label+variety":
        loss, metrics = DiseaseVarietyLoss(), [disease_err, variety_err, disease_loss, variety_loss]
    else:
        loss, metrics = None, [error_rate]
    learn = vision_learner(
        dls,
        member.arch,
        n_out=member.n_out,
        pretrained=bool(member.pretrained),
        loss_func=loss,
        metrics=metrics,
        # GradientAccumulation(bs) steps the optimiser once `bs` images have been seen, whatever the step size.
        cbs=[GradientAccumulation(bs)] if accum > 1 else [],
        **timm_kwargs,
    )
    precision = precision_for(mixed_precision, torch.cuda.is_available())
    if precision == "fp16":
        learn.to_fp16()
    elif precision == "bf16":
        learn.to_bf16()
    quiet_progress(learn)
    return learn


# -- gradient accumulation: the probe's choice, and which accum train uses -----------------------------------------


def choose_accum(peaks: Mapping[int, float | None], budget_gib: float) -> int | None:
    """The smallest accum whose measured peak memory fits `budget_gib`; None when none does.

    A peak of None means that run did not finish (out of memory), so it does not fit.
    """
    fitting = [accum for accum, peak in peaks.items() if peak is not None and peak <= budget_gib]
    return min(fitting, default=None)


def probe_decision_path(member_name: str) -> Path:
    """The probe's decision for a member, the only probe output train reads (and depends on in dvc.yaml).

    {"member": name, "accum": int or null, "accum_source": "probe" | "params" | null}: nothing measured, so a re-probe
    with the same outcome leaves it byte-identical and DVC retrains nothing.
    """
    return Path("metrics/probe") / f"{member_name}.accum.json"


def accum_to_use(member: MemberConfig, decision: Mapping[str, Any]) -> tuple[int, str]:
    """The accum a member trains with and where it comes from: its explicit `accum` in params, else the probe's.

    `decision` is the member's probe decision (probe_decision_path) as a dict.
    """
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
