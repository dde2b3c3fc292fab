"""Gradient accumulation is what the seeds say: the same step as the full batch, unless the model has batch norm.

The probe relies on it (it measures memory per accum and lets train use `GradientAccumulation(bs)` with
`bs // accum` images per step), so it is proved here once, on the CPU in float64, not re-proved on every probe run.
"""

from __future__ import annotations

import copy

import timm
import torch
import torch.nn.functional as F
from fastai.callback.training import GradientAccumulation
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.optimizer import SGD
from torch import nn

from pipeline.torch_setup import quiet_progress

ATOL = 1e-9  # in float64 the sums' rounding is ~1e-16; a real difference is many orders larger


def weights_after_one_step(model: nn.Module, inputs, targets, step_bs: int, cbs: list) -> list[torch.Tensor]:
    """The weights after one epoch of fastai's SGD over `inputs` in batches of `step_bs`, in order, no validation."""
    items = list(zip(inputs, targets))
    train = DataLoader(items, bs=step_bs, shuffle=False, drop_last=False)
    # fastai's Recorder smooths the loss in float32; the cast's gradient is exact, so float64 gradients stay float64.
    learn = Learner(DataLoaders(train, DataLoader([], bs=step_bs)), copy.deepcopy(model), opt_func=SGD, lr=0.1,
                    loss_func=lambda output, target: F.cross_entropy(output, target).float(), cbs=cbs)
    quiet_progress(learn)
    with learn.no_logging():
        learn.fit(1, 0.1)
    return [parameter.detach() for parameter in learn.model.parameters()]


def accumulated_vs_full_batch(model: nn.Module, inputs, targets, k: int) -> float:
    """Largest |weight difference| between k accumulated steps of len(inputs) // k items and one full-batch step."""
    full = weights_after_one_step(model, inputs, targets, len(inputs), [])
    accumulated = weights_after_one_step(model, inputs, targets, len(inputs) // k, [GradientAccumulation(len(inputs))])
    return max(float((a - b).abs().max()) for a, b in zip(accumulated, full))


def test_accumulated_steps_equal_one_full_batch_step_without_batchnorm_and_differ_with_it():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 32, 32, dtype=torch.float64, generator=generator)
    targets = torch.randint(0, 3, (8,), generator=generator)
    torch.manual_seed(1)
    # convnext (LayerNorm, no batch norm), stochastic depth off: it draws other masks for small batches than for one.
    convnext = timm.create_model("convnext_atto", num_classes=3, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64),
                                 drop_path_rate=0.0).double()
    with_batchnorm = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3)).double()
    with_batchnorm(images)  # materialise the lazy layer before the copies

    for k in (2, 4):
        assert accumulated_vs_full_batch(convnext, images, targets, k) <= ATOL
    # Batch norm normalises each small batch by its own statistics: the same check sees the difference.
    assert accumulated_vs_full_batch(with_batchnorm, images, targets, 2) > 1e-6
