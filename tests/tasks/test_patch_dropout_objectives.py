"""Patch dropout in a joint step: at 0 the step is the step without it, bit for bit; grounding, which reads
boxes anywhere in the image, fuses every patch while the other objectives see the kept share."""

from __future__ import annotations

import pytest
import torch

from vlp.platform.model.backbone import FeatureCache
from vlp.platform.model.encoders import VisionConfig
from vlp.tasks.caption import CaptionObjective
from vlp.tasks.grounding import GroundingObjective
from vlp.tasks.itc import ITCObjective
from vlp.tasks.itm import ITMObjective
from vlp.tasks.mlm import MLMObjective
from vlp.tasks.multitask import MultiTaskModule

VISION = {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2}  # conftest's tiny tower
OBJECTIVES = {
    "itc": ITCObjective,
    "itm": ITMObjective,
    "mlm": MLMObjective,
    "caption": CaptionObjective,
    "grounding": GroundingObjective,
}


def joint_step(backbone, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module = MultiTaskModule(backbone, OBJECTIVES, mode="joint")
    module.log = lambda *a, **k: None
    torch.manual_seed(0)
    loss = module.training_step(batch, 0)["loss"]
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in module.named_parameters() if p.grad is not None}


def test_joint_step_at_zero_patch_dropout_equals_the_step_without_it_bit_for_bit(
    make_backbone, batch, one_thread
):
    plain_loss, plain_grads = joint_step(make_backbone(caption_decoder=True), batch)
    zero = make_backbone(caption_decoder=True, vision=VisionConfig(**VISION, patch_dropout=0.0))
    zero_loss, zero_grads = joint_step(zero, batch)
    assert torch.equal(zero_loss, plain_loss)
    assert zero_grads.keys() == plain_grads.keys() and len(plain_grads) > 20
    for name, grad in plain_grads.items():
        assert torch.equal(zero_grads[name], grad), name


@pytest.mark.parametrize("all_patches", [True, False])
def test_grounding_opts_out_of_patch_dropout(make_backbone, batch, one_thread, all_patches):
    def grounding_loss(patch_dropout: float) -> torch.Tensor:
        backbone = make_backbone(vision=VisionConfig(**VISION, patch_dropout=patch_dropout)).train()
        grounding = GroundingObjective(backbone, all_patches=all_patches)
        features = FeatureCache(backbone, batch)
        torch.manual_seed(0)
        features.image  # noqa: B018  (ITC's pass of the joint step first: it draws the kept patches)
        return grounding.forward_loss(batch, features).loss

    every_patch = grounding_loss(0.0)
    if all_patches:
        torch.testing.assert_close(grounding_loss(0.5), every_patch, rtol=0, atol=0)
    else:
        assert not torch.allclose(grounding_loss(0.5), every_patch)
