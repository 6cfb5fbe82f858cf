"""A joint step that shares its fusion work (image keys and values once per image, each caption's first
self-attention once, only the read tokens through the last layer: [CLS] for ITM and grounding, the masked
ones for MLM) and runs the real tokens packed equals the step that recomputes everything per pass over the
padded batch: the same loss and the same gradient on every parameter."""

from __future__ import annotations

import pytest
import torch

import vlp.platform.model.length_buckets as buckets_module
import vlp.platform.model.packing as packing_module
from vlp.platform.model.backbone import FusionBackbone
from vlp.platform.model.fusion import FusionConfig
from vlp.platform.model.token_merging import TokenMergingConfig
from vlp.tasks.caption import CaptionObjective
from vlp.tasks.grounding import GroundingObjective
from vlp.tasks.itc import ITCObjective
from vlp.tasks.itm import ITMObjective
from vlp.tasks.mlm import MLMObjective
from vlp.tasks.multitask import MultiTaskModule

OBJECTIVES = {
    "itc": ITCObjective,
    "itm": ITMObjective,
    "mlm": MLMObjective,
    "caption": CaptionObjective,
    "grounding": GroundingObjective,
}


def unshared(monkeypatch) -> None:
    """Every fused pass computes its own keys and values and the whole fusion over the whole padded batch, as
    before the sharing (no length groups, no packing)."""
    monkeypatch.setattr(buckets_module, "length_buckets", lambda mask, *a, **k: [(None, mask.shape[1])])
    monkeypatch.setattr(packing_module, "MIN_PADDING", 2.0)
    monkeypatch.setattr(FusionBackbone, "with_fusion_keys", lambda self, image: image)
    monkeypatch.setattr(FusionBackbone, "first_self_attention", lambda self, tokens, mask, sizes=None: None)
    original_fuse = FusionBackbone.fuse

    def full_fuse(self, image, text_tokens, attention_mask, merge_text=True, positions=None, **kw):
        fused = original_fuse(self, image, text_tokens, attention_mask, merge_text=merge_text, **kw)
        return (
            fused
            if positions is None
            else fused.gather(1, positions[..., None].expand(-1, -1, fused.shape[-1]))
        )

    monkeypatch.setattr(FusionBackbone, "fuse", full_fuse)


def joint_step(make_backbone, batch, seed: int, merging: TokenMergingConfig | None = None):
    backbone = make_backbone(
        caption_decoder=True, fusion=FusionConfig(depth=2, heads=2), merging=merging
    )  # a first and a last layer
    module = MultiTaskModule(backbone, OBJECTIVES, mode="joint")
    module.log = lambda *a, **k: None
    torch.manual_seed(seed)
    loss = module.training_step(batch, 0)["loss"]
    loss.backward()
    return loss.detach(), {
        name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None
    }


@pytest.fixture
def wide_batch(shapes) -> dict:
    """48 rows: enough for the passes to run in groups of similar caption length (of 16 rows, set in the
    test; the default groups only from 128 rows)."""
    dataset = shapes.dataset("train")
    return shapes.collate([dataset[i] for i in range(48)])


@pytest.mark.parametrize("seed", [0, 1])
def test_joint_step_with_shared_work_equals_the_recomputed_step(
    make_backbone, wide_batch, monkeypatch, one_thread, seed
):
    monkeypatch.setattr(buckets_module, "MIN_ROWS", 16)
    assert len(buckets_module.length_buckets(wide_batch["attention_mask"])) == 3
    batch = wide_batch
    shared_loss, shared_grads = joint_step(make_backbone, batch, seed)
    with monkeypatch.context() as patch:
        unshared(patch)
        full_loss, full_grads = joint_step(make_backbone, batch, seed)
    torch.testing.assert_close(shared_loss, full_loss, atol=1e-5, rtol=1e-5)
    assert shared_grads.keys() == full_grads.keys() and len(full_grads) > 20
    for name, grad in full_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


MERGINGS = {
    "vision": TokenMergingConfig(vision_r=4),
    "vision+text": TokenMergingConfig(vision_r=4, text_r=3),
    "vision+text+fusion": TokenMergingConfig(vision_r=4, text_r=3, fusion_r=3),
    "vision+text entry+text": TokenMergingConfig(vision_r=4, text_entry_r=4, text_r=2),
    # blocks that merge and unmerge, the output kept whole: the fusion reads every patch
    "unmerging vision+text entry+text": TokenMergingConfig(
        vision_r=6, vision_unmerge=True, vision_merge_output=False, text_entry_r=4, text_r=2
    ),
}


@pytest.mark.parametrize("merging", list(MERGINGS))
def test_merged_joint_step_with_shared_work_equals_the_recomputed_step(
    make_backbone, wide_batch, monkeypatch, one_thread, merging
):
    """Token merging (vision ToMe, text ToMe at the fusion's entry and inside it, text-guided image merging)
    keeps every shortcut of the joint step: image keys and values once per image, each caption's entry merge
    and first self-attention once, the read rows alone through the last layer, packing and length groups."""
    monkeypatch.setattr(buckets_module, "MIN_ROWS", 16)
    shared_loss, shared_grads = joint_step(make_backbone, wide_batch, 0, MERGINGS[merging])
    with monkeypatch.context() as patch:
        unshared(patch)
        full_loss, full_grads = joint_step(make_backbone, wide_batch, 0, MERGINGS[merging])
    torch.testing.assert_close(shared_loss, full_loss, atol=1e-5, rtol=1e-5)
    assert shared_grads.keys() == full_grads.keys() and len(full_grads) > 20
    for name, grad in full_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("merging", [None, *MERGINGS])
def test_image_keys_and_values_are_computed_once_per_joint_step(make_backbone, batch, merging):
    backbone = make_backbone(caption_decoder=True, merging=merging and MERGINGS[merging])
    module = MultiTaskModule(backbone, OBJECTIVES, mode="joint")
    module.log = lambda *a, **k: None
    projections = []
    for layer in backbone.fusion.layers:
        layer.cross_attn.key_value.register_forward_hook(
            lambda _m, args, _o: projections.append(args[0].shape)
        )
    module.training_step(batch, 0)
    image = backbone.encode_image(batch["image"])
    image_tokens = image.tokens.shape
    layers, width = len(backbone.fusion.layers), image_tokens[-1]
    # grounding reads a merged image on its patch grid, whose keys and values are the merged tokens' gathered
    # plus the position embeddings' [1, 1 + N, Dv], projected once per batch with a zero token (the bias taken
    # off): never the grid itself
    per_batch = [shape for shape in projections if len(shape) < 3 or shape[0] == 1]
    images = [shape for shape in projections if not (len(shape) < 3 or shape[0] == 1)]
    grid = (1, backbone.vision.num_tokens, width)
    assert per_batch == ([grid, (width,)] * layers if image.grid is not None else [])
    # one batch pass per layer; fusion merging projects its merged image tokens in the layers after the first
    assert images[:layers] == [image_tokens] * layers
    if merging is None or MERGINGS[merging].fusion_r == 0:
        assert len(images) == layers
