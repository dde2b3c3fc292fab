"""Gradient accumulation is what the seeds say: the same step as the full batch, unless the model has batch norm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.probe import EQUIVALENCE_ATOL, grad_accum_equivalence, has_batchnorm, member_grad_accum_check
from pipeline.vision import MemberConfig


def tiny_batch(n_items: int = 8):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(n_items, 5, dtype=torch.float64, generator=generator)
    targets = torch.randint(0, 3, (n_items,), generator=generator)
    return inputs, targets


def mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()


def mlp_with_batchnorm():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3)).double()


@pytest.mark.parametrize("k", [2, 4])
def test_without_batchnorm_accumulated_step_equals_full_batch_step(k):
    inputs, targets = tiny_batch()
    assert grad_accum_equivalence(mlp, inputs, targets, k) <= EQUIVALENCE_ATOL


def test_with_batchnorm_the_difference_is_reported_not_hidden():
    inputs, targets = tiny_batch()
    assert grad_accum_equivalence(mlp_with_batchnorm, inputs, targets, 2) > 1e-6


def test_k_must_divide_the_batch():
    inputs, targets = tiny_batch()
    with pytest.raises(ValueError, match="divisor"):
        grad_accum_equivalence(mlp, inputs, targets, 3)


def test_a_timm_convnext_without_batchnorm_is_equivalent():
    import timm

    def convnext():
        torch.manual_seed(1)
        return timm.create_model("convnext_atto", num_classes=3, pretrained=False).double()

    assert not has_batchnorm(convnext())
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=generator)
    targets = torch.tensor([0, 1, 2, 1])
    assert grad_accum_equivalence(convnext, inputs, targets, 2) <= EQUIVALENCE_ATOL


def test_member_check_reports_fastais_batchnorm_head():
    # vision_learner puts BatchNorm1d in its head, so even a convnext member is not exactly equivalent.
    member = MemberConfig(arch="convnext_atto", resize=40, size=32, epochs=1, schedule="fit_one_cycle")
    check = member_grad_accum_check(member, seed=0, device=torch.device("cpu"))
    assert check["has_batchnorm"] is True
    assert check["max_abs_weight_diff"] > EQUIVALENCE_ATOL
    assert check["equivalent"] is False
