"""The member's model pieces: the seeds' multi-target loss and metrics, disease probabilities, precision choice."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline import vision


@pytest.fixture
def multi_target_batch():
    torch.manual_seed(0)
    logits = torch.randn(6, 20)
    disease = torch.tensor([0, 1, 2, 3, 4, 9])
    variety = torch.tensor([9, 8, 7, 6, 5, 0])
    return logits, disease, variety


def test_combined_loss_is_disease_plus_variety_cross_entropy(multi_target_batch):
    logits, disease, variety = multi_target_batch
    expected = F.cross_entropy(logits[:, :10], disease) + F.cross_entropy(logits[:, 10:], variety)
    assert torch.allclose(vision.DiseaseVarietyLoss()(logits, disease, variety), expected)


def test_per_target_errors_read_their_own_ten_logits():
    logits = torch.zeros(2, 20)
    logits[0, 3], logits[0, 10 + 5] = 1, 1  # disease 3, variety 5
    logits[1, 7], logits[1, 10 + 2] = 1, 1  # disease 7, variety 2
    disease, variety = torch.tensor([3, 0]), torch.tensor([5, 2])
    assert float(vision.disease_err(logits, disease, variety)) == 0.5
    assert float(vision.variety_err(logits, disease, variety)) == 0.0


def test_activation_gives_each_head_probabilities_and_decodes_to_the_disease(multi_target_batch):
    logits, _, _ = multi_target_batch
    loss = vision.DiseaseVarietyLoss()
    probs = loss.activation(logits)
    assert torch.allclose(probs[:, :10].sum(dim=1), torch.ones(6))
    assert torch.allclose(probs[:, 10:].sum(dim=1), torch.ones(6))
    assert torch.equal(vision.disease_probs(probs), probs[:, :10])
    assert torch.equal(loss.decodes(logits), logits[:, :10].argmax(dim=1))


@pytest.mark.parametrize(
    "requested, cuda, expected",
    [
        ("auto", False, "fp32"),
        ("fp16", False, "fp32"),
        ("bf16", False, "fp32"),
        ("auto", True, "fp16"),
        ("bf16", True, "bf16"),
        ("fp32", True, "fp32"),
    ],
)
def test_precision_is_fp32_on_cpu_and_fp16_on_cuda_unless_asked(requested, cuda, expected):
    assert vision.precision_for(requested, cuda) == expected


def test_batch_size_divides_bs_by_accum_and_rejects_accum_above_bs():
    assert vision.batch_size(64, 4) == 16
    with pytest.raises(ValueError, match="between 1 and the batch size"):
        vision.batch_size(8, 16)
