"""Gradient accumulation is what the seeds say: the same step as the full batch, unless the model has batch norm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.probe import (
    EQUIVALENCE_ATOL,
    grad_accum_equivalence,
    has_batchnorm,
    member_grad_accum_check,
    without_dropout,
)
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


def test_stochastic_depth_is_turned_off_so_it_cannot_pass_for_a_difference():
    import timm

    def convnext_with_drop_path():  # swin's default drop_path_rate is 0.1
        torch.manual_seed(1)
        return timm.create_model(
            "convnext_atto", num_classes=3, drop_path_rate=0.5, depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)
        ).double()

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=generator)
    targets = torch.tensor([0, 1, 2, 1])
    assert grad_accum_equivalence(convnext_with_drop_path, inputs, targets, 2) > 1e-6
    turned_off = grad_accum_equivalence(lambda: without_dropout(convnext_with_drop_path()), inputs, targets, 2)
    assert turned_off <= EQUIVALENCE_ATOL


def test_member_check_reports_fastais_batchnorm_head():
    # vision_learner puts BatchNorm1d in its head, so even a convnext member is not exactly equivalent.
    member = MemberConfig(arch="convnext_atto", resize=40, size=32, epochs=1, schedule="fit_one_cycle")
    check = member_grad_accum_check(member, seed=0)
    assert check["has_batchnorm"] is True
    assert check["head"]["norm_layers"] == ["BatchNorm1d"] and check["head"]["equivalent"] is False
    assert check["max_abs_weight_diff"] > EQUIVALENCE_ATOL
    assert check["equivalent"] is False


def test_member_check_runs_a_large_members_head_at_its_real_width_and_a_small_body_of_its_family():
    # convnext_large's body outputs 1536 channels; its check builds neither that body nor its 198M parameters.
    member = MemberConfig(arch="convnext_large_in22k", resize=64, size=(64, 96), epochs=1)
    check = member_grad_accum_check(member, seed=0)
    assert check["head"]["input_shape"] == [8, 1536, 2, 3]
    assert check["body"]["family"] == "convnext" and check["body"]["shrunk_by"]["depths"] == (1, 1, 1, 1)
    assert check["body"]["norm_layers"] == ["LayerNorm", "LayerNorm2d"]  # convnext_large's own, unlike atto's
    assert check["body"]["equivalent"] is True


def test_a_batchnorm_body_is_reported_not_equivalent():
    member = MemberConfig(arch="resnet10t", resize=40, size=32, epochs=1, schedule="fit_one_cycle")
    check = member_grad_accum_check(member, seed=0)
    assert check["body"]["family"] == "resnet" and check["body"]["norm_layers"] == ["BatchNorm2d"]
    assert check["body"]["max_abs_weight_diff"] > 1e-6 and check["body"]["equivalent"] is False


def test_a_large_body_of_an_unlisted_family_is_left_out_and_said_so():
    member = MemberConfig(arch="efficientnet_b7", resize=40, size=32, epochs=1)
    check = member_grad_accum_check(member, seed=0)
    assert "efficientnet" in check["body"]["skipped"] and "equivalent" not in check["body"]
    assert check["head"]["input_shape"][1] == 2560  # the head is still checked at its real width
    assert check["equivalent"] is False  # the head's batch norm decides it; without that it would be None
