"""The ensemble members' configs (`train`, `probe`): what probe@<member> and train@<member> read, apart from their code.

No torch here, so that the params stage checks every key in a moment rather than half a minute. The names only timm
and albumentations know (a member's `arch`, its albumentations transforms) are checked by vision.load_train_config,
for every member at the start of every probe and train.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

from pipeline.paddy import CLASSES, VARIETIES
from pipeline.params import (PARAMS_FILE, Check, FieldError, ParamsError, Positive, PositiveInt, from_mapping,
                             known_values, load_section, section_of)


def sides(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a size; an int is square."""
    return size if isinstance(size, tuple) else (size, size)


Size = Annotated[int | tuple[int, int], Check(lambda s: min(sides(s)) >= 8, "use at least 8 pixels a side")]
PositiveOrNull = Annotated[int | None, Check(lambda n: n is None or n >= 1, "use null or a positive integer")]
Alpha = Annotated[float, Check(lambda a: a >= 0, "use a positive alpha, or 0 for none")]


@dataclass(frozen=True)
class MemberConfig:
    """One ensemble member (a `train.members.<name>` entry of params.yaml)."""

    arch: str  # a timm model name (the registry is timm's, not ours; vision.load_train_config checks it)
    pretrained: bool | str = False  # false | true (timm hub weights) | path to a local weights file
    images: Literal["full", "small"] = "full"  # small: data/paddy_small, every image pre-resized (stage small_images)
    resize: Size = 480  # item transform size; a pair is (height, width), as fastai's Resize takes it
    method: Literal["squish", "pad", "crop"] = "squish"
    size: Size = 224  # batch transform (aug_transforms) size; a pair is (height, width)
    targets: Literal["label", "label+variety"] = "label"
    epochs: PositiveInt = 12
    lr: Annotated[float | Literal["find"], Check(lambda lr: lr == "find" or 0 < lr < 10,
                                                 "use a positive number below 10, or 'find'")] = 0.01
    schedule: Literal["fine_tune", "fit_one_cycle"] = "fine_tune"
    accum: PositiveOrNull = None  # None: the probe's choice
    min_scale: Annotated[float, Check(lambda s: 0 < s <= 1, "use a number in (0, 1]")] = 0.75
    # Item-level augmentation with albumentations, applied to training items only: {TransformName: {kwargs}}.
    albumentations: dict[str, dict[str, Any]] = field(default_factory=dict)  # checked by vision too
    # A smoke test's cap (make rehearsal): optimiser steps per training epoch, validation and TTA left whole; None:
    # every batch. Not for real runs: the one-cycle schedule is cut short with it.
    max_steps_per_epoch: PositiveOrNull = None
    # Training tricks, each the library's own (vision.member_learner): fastai's LabelSmoothingCrossEntropyFlat eps;
    # fastai's MixUp or CutMix alpha (0: off); timm's ModelEmaV3 decay (null: off), whose weights are saved.
    label_smoothing: Annotated[float, Check(lambda eps: 0 <= eps < 1, "use a number in [0, 1), 0 for none")] = 0.0
    mixup: Alpha = 0.0
    cutmix: Alpha = 0.0
    ema: Annotated[float | None, Check(lambda decay: decay is None or 0 < decay < 1,
                                       "use a decay in (0, 1) such as 0.999, or null for none")] = None
    # Progressive resizing: the batch `size` of each phase, smallest first, ending at `size`; epochs split evenly.
    progressive: tuple[Size, ...] | None = None

    def __post_init__(self):
        if isinstance(self.pretrained, str) and not Path(self.pretrained).is_file():
            raise ValueError(f"pretrained weights file {self.pretrained!r} not found; fix the path or use true/false")
        if self.mixup and self.cutmix:
            raise FieldError("cutmix", "and mixup are both set; set one of them (the other 0)")
        if self.cutmix and self.targets == "label+variety":  # fastai's CutMix mixes the first target only
            raise FieldError("cutmix", "does not mix the variety target of label+variety; use mixup, or targets: label")
        if self.progressive is not None:
            shown, size = ([list(s) if isinstance(s, tuple) else s for s in v] for v in (self.progressive, [self.size]))
            if not self.progressive or sides(self.progressive[-1]) != sides(self.size):
                raise FieldError("progressive", f"is {shown}; end it with the member's size {size[0]}")
            if any(a > b for s in self.progressive for a, b in zip(sides(s), sides(self.size))):  # the probe's size
                raise FieldError("progressive", f"is {shown}; no phase's size may exceed the member's size {size[0]}")
            if any(sides(a) == sides(b) for a, b in zip(self.progressive, self.progressive[1:])):
                raise FieldError("progressive", f"is {shown}; a phase has the size of the one before it: merge them")
            if self.epochs < len(self.progressive):
                raise FieldError("progressive", f"has {len(self.progressive)} phases, more than epochs {self.epochs}")

    @property
    def n_out(self) -> int:
        return len(CLASSES) + (len(VARIETIES) if self.targets == "label+variety" else 0)


@dataclass(frozen=True)
class TrainConfig:
    """The `train` section: settings shared by all members, and the members themselves."""

    bs: PositiveInt
    members: Annotated[dict[str, MemberConfig], Check(bool, "define at least one ensemble member")]
    member_defaults: dict[str, Any] = field(default_factory=dict)  # already merged into `members` by the loader
    tta: bool = True
    # auto: fp16 on CUDA (the seeds' to_fp16), fp32 on CPU; bf16 suits GPUs that have it (Ampere and later).
    precision: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    # DataLoader worker processes; auto: see loader_workers
    num_workers: Annotated[int | Literal["auto"], Check(lambda n: n == "auto" or n >= 0,
                                                        "use auto or a non-negative integer")] = "auto"
    # auto: one process per visible GPU (DDP when more than one), one on a CPU; a count > 1 on a CPU runs gloo.
    devices: Annotated[int | Literal["auto"], Check(lambda n: n == "auto" or n >= 1,
                                                    "use auto or a positive count")] = "auto"

    def member(self, name: str) -> MemberConfig:
        if name not in self.members:
            raise ParamsError(f"params.yaml: no member {name!r} under train.members; use one of: "
                              f"{', '.join(self.members)}")
        return self.members[name]


def load_train_config(params: Mapping[str, Any]) -> TrainConfig:
    """The `train` section, `train.member_defaults` merged into every member (a member's own keys win), every key
    checked but the names only timm and albumentations know (vision.load_train_config checks those too)."""
    raw = section_of(params, "train")
    if not isinstance(raw, Mapping) or not isinstance(raw.get("members"), Mapping):
        return from_mapping(TrainConfig, raw, "train")  # its error names what is wrong
    defaults = raw.get("member_defaults", {})
    known_values(MemberConfig, defaults, "train.member_defaults")  # a bad default is named where it is written
    members = {name: {**defaults, **member} if isinstance(member, Mapping) else member
               for name, member in raw["members"].items()}
    config = from_mapping(TrainConfig, {**raw, "members": members}, "train")
    for name, member in config.members.items():
        if member.accum is not None and member.accum > config.bs:
            where = f"members.{name}" if "accum" in raw["members"][name] else "member_defaults"
            raise ParamsError(f"{PARAMS_FILE}: key 'train.{where}.accum' is {member.accum}, more than train.bs "
                              f"{config.bs}; use an accum <= bs, or null for the probe's choice")
    return config


@dataclass(frozen=True)
class ProbeConfig:
    """The `probe` section of params.yaml."""

    accums: Annotated[list[PositiveInt], Check(bool, "use a non-empty list")]  # candidate gradient-accumulation factors
    budget_gib: Positive  # memory of the GPU the real run must fit (16 GiB: a Kaggle GPU)
    epochs: PositiveInt = 1


def load_probe_config(params: Mapping[str, Any], bs: int, processes: int) -> ProbeConfig:
    """The `probe` section; every candidate accum must fit the batch one of `processes` processes holds, bs //
    processes (pipeline/distributed.py), since that is what the probe measures and train steps through."""
    config = load_section(ProbeConfig, params, "probe")
    process_bs = bs // processes
    too_large = [accum for accum in config.accums if accum > process_bs]
    if too_large:
        raise ParamsError(f"{PARAMS_FILE}: key 'probe.accums' has {too_large[0]}, more than train.bs {bs} // "
                          f"{processes} process(es) = {process_bs} images per process; use accums <= {process_bs}")
    return config
