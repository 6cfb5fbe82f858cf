"""FLIP's patch dropout (`vision.patch_dropout`): in training each image keeps a random share of its patch
tokens, [CLS] always; evaluation and `all_patches` see every patch; 0 is the tower without it, bit for bit."""

from __future__ import annotations

import pytest
import torch

from vlp.platform.model.backbone import FeatureCache
from vlp.platform.model.encoders import VisionConfig
from vlp.platform.model.token_merging import TokenMergingConfig

VISION = {"image_size": 32, "patch_size": 8, "width": 32, "depth": 1, "heads": 2}  # 16 patches


def dropped(backbone, images: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(the tokens entering patch dropout [B, 17, D], the tokens leaving it) of one `encode_image`."""
    seen = []
    hook = backbone.vision.vit.patch_drop.register_forward_hook(
        lambda _m, args, out: seen.append((args[0], out))
    )
    try:
        backbone.encode_image(images, **kwargs)
    finally:
        hook.remove()
    return seen[0] if seen else (None, None)


@pytest.mark.parametrize(("share", "kept"), [(0.5, 8), (0.75, 4)])
def test_training_keeps_cls_and_a_random_share_of_the_patches(make_backbone, batch, share, kept):
    backbone = make_backbone(vision=VisionConfig(**VISION, patch_dropout=share)).train()
    images = batch["image"]
    torch.manual_seed(0)
    before, after = dropped(backbone, images)
    assert after.shape == (len(images), 1 + kept, 32)
    torch.testing.assert_close(after[:, 0], before[:, 0], rtol=0, atol=0)  # [CLS] first, untouched
    for row_in, row_out in zip(before, after, strict=True):
        matches = (row_out[1:, None] == row_in[None, 1:]).all(dim=-1)  # [kept, 16]
        assert torch.equal(matches.sum(dim=1), torch.ones(kept, dtype=torch.long))  # each one patch, distinct
        assert matches.any(dim=0).sum() == kept
    assert backbone.encode_image(images).tokens.shape[1] == 1 + kept
    assert backbone.encode_image(images, all_patches=True).tokens.shape[1] == 17
    assert backbone.eval().encode_image(images).tokens.shape[1] == 17  # off in evaluation


def test_kept_patches_follow_the_seed_and_resume_from_the_rng_state(make_backbone, batch):
    backbone = make_backbone(vision=VisionConfig(**VISION, patch_dropout=0.5)).train()
    images = batch["image"]
    torch.manual_seed(3)
    first = backbone.encode_image(images).tokens
    state = torch.get_rng_state()
    second = backbone.encode_image(images).tokens
    torch.manual_seed(3)
    torch.testing.assert_close(backbone.encode_image(images).tokens, first, rtol=0, atol=0)
    torch.set_rng_state(state)  # a resumed run restores the RNG: it draws the same patches
    torch.testing.assert_close(backbone.encode_image(images).tokens, second, rtol=0, atol=0)
    assert not torch.equal(first, second)


def test_zero_patch_dropout_is_the_tower_without_it_bit_for_bit(make_backbone, batch):
    plain = make_backbone(vision=VisionConfig(**VISION)).train()
    zero = make_backbone(vision=VisionConfig(**VISION, patch_dropout=0.0)).train()
    assert isinstance(zero.vision.vit.patch_drop, torch.nn.Identity)
    torch.manual_seed(0)
    want = plain.encode_image(batch["image"])
    rng = torch.get_rng_state()
    torch.manual_seed(0)
    got = zero.encode_image(batch["image"])
    assert torch.equal(torch.get_rng_state(), rng)  # no draw
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.embedding, want.embedding)


def test_feature_cache_reads_every_patch_only_where_asked_and_only_while_dropping(make_backbone, batch):
    backbone = make_backbone(vision=VisionConfig(**VISION, patch_dropout=0.5)).train()
    features = FeatureCache(backbone, batch)
    assert features.image.tokens.shape[1] == 9 and features.image_all_patches.tokens.shape[1] == 17
    assert features.fused_image_all_patches.fusion_kv[0][0].shape[2] == 17
    backbone.eval()
    features = FeatureCache(backbone, batch)
    assert features.image_all_patches is features.image  # nothing dropped: no second vision pass


def test_patch_dropout_composes_with_vision_merging(make_backbone, batch):
    backbone = make_backbone(
        vision=VisionConfig(**VISION, patch_dropout=0.5), merging=TokenMergingConfig(vision_r=2)
    ).train()
    image = backbone.encode_image(batch["image"])
    assert image.tokens.shape[1] == 1 + 8 - 2 and image.sizes.sum(dim=1).eq(9).all()


@pytest.mark.parametrize("share", [-0.1, 1.0])
def test_bad_patch_dropout_is_rejected(share):
    with pytest.raises(ValueError, match="vision.patch_dropout must lie in"):
        VisionConfig(patch_dropout=share)
