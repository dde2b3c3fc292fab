"""Every architecture family the profiles use trains, predicts and TTAs through the project's own learner.

The families of pipeline/profiles/*.yaml (convnext, vit, swin, swinv2, resnet), each at its smallest timm variant
and a tiny input, built by vision.member_dataloaders + vision.member_learner exactly as probe and train build them.
"""

from __future__ import annotations

import pytest
import timm
import torch

from pipeline import vision
from pipeline.paddy import CLASSES, read_train_table
from pipeline.vision import MemberConfig

BS = 4
# One tiny variant per family; vit and swin are built for the member's size by timm (their img_size), at a
# non-square size where the family allows it.
FAMILIES = {
    "convnext": dict(arch="convnext_atto", size=32),
    "vit": dict(arch="vit_tiny_patch16_224", size=(32, 48)),
    "swin": dict(arch="swin_tiny_patch4_window7_224", size=(32, 64)),
    # swinv2 at 64, not 32: at 32 px its last stage is 1x1, a window of 1 token, whose relative-position table timm
    # <= 1.0.30 normalises by (window - 1) = 0: NaN. 64 px leaves every stage a window of >= 2 (256 px: 8), as in use.
    "swinv2": dict(arch="swinv2_tiny_window8_256", size=64),
    "resnet": dict(arch="resnet10t", size=(32, 48)),
}


def tiny_member(arch: str, size, **settings) -> MemberConfig:
    return MemberConfig(arch=arch, resize=64, size=size, epochs=1, lr=1e-3, schedule="fit_one_cycle", **settings)


@pytest.fixture(scope="module")
def tiny_table(tiny_paddy):
    """One step's worth of training images and two validation images."""
    table = read_train_table(tiny_paddy).groupby("label").head(1).head(BS + 2).reset_index(drop=True)
    table["is_valid"] = table.index >= BS
    return table


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_a_step_then_predicts_and_ttas(family, tiny_table):
    member = tiny_member(**FAMILIES[family])
    dls = vision.member_dataloaders(member, tiny_table, bs=BS, accum=1, seed=0)
    learn = vision.member_learner(member, dls, bs=BS, accum=1)
    before = [p.detach().clone() for p in learn.model.parameters()]

    learn.fit(1, 1e-3)

    assert any(not torch.equal(a, b) for a, b in zip(before, learn.model.parameters())), "the step changed nothing"
    assert torch.isfinite(torch.tensor(learn.recorder.losses)).all()
    for probs, targets in (learn.get_preds(), learn.tta(n=2)):
        assert probs.shape == (2, len(CLASSES))
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))


@pytest.mark.parametrize("family", ["swin", "swinv2"])
def test_the_head_pools_a_channels_last_model_over_its_spatial_dims_as_timm_does(family):
    """fastai's head concatenates max and average pooling; its average half must be timm's own pooled features."""
    member = tiny_member(**FAMILIES[family])
    body, head = vision.member_network(member)
    assert body.model.output_fmt == "NHWC"
    height, width = member.size if isinstance(member.size, tuple) else (member.size, member.size)
    torch.manual_seed(0)
    images = torch.randn(2, 3, height, width)
    body.eval()
    with torch.no_grad():
        pooled = head[:2](body(images))  # AdaptiveConcatPool2d, Flatten
        timm_pooled = body.model.forward_head(body.model.forward_features(images), pre_logits=True)
    width = body.model.num_features
    torch.testing.assert_close(pooled[:, width:], timm_pooled)


def test_a_fixed_size_model_pretrained_at_another_size_is_resampled_to_the_members(tmp_path):
    """vit's position embeddings are per patch: timm resamples the saved 224 px grid to the member's size."""
    native = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    weights = tmp_path / "vit_tiny_224.pth"
    torch.save(native.state_dict(), weights)
    member = tiny_member("vit_tiny_patch16_224", (32, 48), pretrained=str(weights))

    vit = vision.member_network(member)[0].model

    assert vit.patch_embed.grid_size == (2, 3)
    assert vit.pos_embed.shape == (1, 1 + 2 * 3, native.embed_dim)
    torch.testing.assert_close(vit.cls_token, native.cls_token)
    torch.testing.assert_close(vit.pos_embed[:, 0], native.pos_embed[:, 0])  # the class token's is kept as is
    torch.testing.assert_close(vit.blocks[0].attn.qkv.weight, native.blocks[0].attn.qkv.weight)
