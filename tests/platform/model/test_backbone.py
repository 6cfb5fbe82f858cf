import math

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from vlp.platform.model.backbone import FeatureCache
from vlp.platform.model.encoders import TextConfig, TextEncoder, VisionConfig, VisionEncoder


def test_passes_have_documented_shapes(backbone, batch):
    image = backbone.encode_image(batch["image"])
    text = backbone.encode_text(batch["input_ids"], batch["attention_mask"])
    b, length = batch["input_ids"].shape
    assert image.tokens.shape == (b, 1 + (32 // 8) ** 2, 32)
    assert image.embedding.shape == text.embedding.shape == (b, 16)
    torch.testing.assert_close(image.embedding.norm(dim=-1), torch.ones(b))
    torch.testing.assert_close(text.embedding.norm(dim=-1), torch.ones(b))
    fused = backbone.fuse(image, text.tokens, text.attention_mask)
    assert fused.shape == (b, length, 32)


def test_fused_real_tokens_ignore_padding_content(backbone, batch):
    image = backbone.encode_image(batch["image"][:1])
    ids, mask = batch["input_ids"][:1], batch["attention_mask"][:1]
    padded_ids = torch.cat([ids, torch.full((1, 3), backbone.tokenizer.pad_token_id)], 1)
    padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=mask.dtype)], 1)
    plain = backbone.fuse(image, backbone.text(ids, mask), mask)
    padded = backbone.fuse(image, backbone.text(padded_ids, padded_mask), padded_mask)
    real = int(mask.sum())
    torch.testing.assert_close(padded[:, :real], plain[:, :real], atol=1e-5, rtol=1e-5)


def test_logit_scale_starts_at_clip_init_and_is_clamped(backbone):
    assert backbone.logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        backbone.log_logit_scale.fill_(10.0)
    assert backbone.logit_scale().item() == pytest.approx(100.0, rel=1e-5)


def test_special_tokens_mask_marks_cls_sep_pad(backbone, batch):
    ids = batch["input_ids"]
    special = backbone.special_tokens_mask(ids)
    assert special[:, 0].all()  # [CLS]
    tok = backbone.tokenizer
    assert (
        special == torch.isin(ids, torch.tensor([tok.cls_token_id, tok.sep_token_id, tok.pad_token_id]))
    ).all()


def test_feature_cache_runs_each_pass_once(backbone, batch):
    calls = {"vision": 0, "text": 0}
    backbone.vision.register_forward_hook(lambda *_: calls.__setitem__("vision", calls["vision"] + 1))
    backbone.text.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1))
    cache = FeatureCache(backbone, batch)
    for _ in range(3):
        assert cache.image.tokens is not None and cache.text.tokens is not None
    assert calls == {"vision": 1, "text": 1}


def test_vision_tower_loads_a_local_checkpoint_with_other_image_size(tmp_path):
    source = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    path = tmp_path / "vit.safetensors"
    save_file(source.state_dict(), str(path))
    encoder = VisionEncoder(
        VisionConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2, pretrained=str(path))
    )
    torch.testing.assert_close(encoder.vit.patch_embed.proj.weight, source.patch_embed.proj.weight)
    assert encoder.vit.pos_embed.shape == (1, 1 + 16, 32)  # resampled from 1 + 4 positions


def test_text_tower_loads_a_local_directory(tmp_path, shapes):
    first = TextEncoder(TextConfig(width=32, depth=1, heads=2, max_len=48), len(shapes.tokenizer), 0)
    first.bert.save_pretrained(tmp_path / "bert")
    loaded = TextEncoder(TextConfig(pretrained=str(tmp_path / "bert")), len(shapes.tokenizer), 0)
    ids = torch.tensor([[2, 7, 9, 3]])
    mask = torch.ones_like(ids)
    first.eval(), loaded.eval()
    torch.testing.assert_close(loaded(ids, mask), first(ids, mask))


def test_missing_pretrained_paths_fail_naming_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="vision.pretrained.*nope.safetensors"):
        VisionEncoder(
            VisionConfig(
                image_size=32, patch_size=8, width=32, depth=1, heads=2, pretrained="nope.safetensors"
            )
        )
    with pytest.raises(FileNotFoundError, match="text.pretrained"):
        TextEncoder(TextConfig(pretrained=str(tmp_path / "missing")), 10, 0)


def test_image_size_must_divide_into_patches():
    with pytest.raises(ValueError, match="patch_size"):
        VisionEncoder(VisionConfig(image_size=30, patch_size=8))


def test_sincos_position_init_is_the_2d_table_and_stays_trainable():
    from timm.layers import build_sincos2d_pos_embed

    config = VisionConfig(image_size=48, patch_size=16, width=32, depth=1, heads=2, pos_init="sincos")
    pos = VisionEncoder(config).vit.pos_embed
    assert pos.requires_grad and pos.shape == (1, 1 + 9, 32)
    torch.testing.assert_close(pos[0, 1:], build_sincos2d_pos_embed([3, 3], 32))
    assert pos[0, 0].abs().max() == 0  # the [CLS] token has no position
    assert len({tuple(row.tolist()) for row in pos[0, 1:]}) == 9  # every patch its own code
    random_start = VisionEncoder(VisionConfig(image_size=48, patch_size=16, width=32, depth=1, heads=2))
    assert pos[0, 1:].std() > 10 * random_start.vit.pos_embed.std()


def test_sincos_position_init_needs_width_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        VisionEncoder(VisionConfig(image_size=32, patch_size=16, width=30, heads=2, pos_init="sincos"))


def test_backbone_without_tokenizer_is_a_clear_error():
    from vlp.platform.model.backbone import FusionBackbone

    with pytest.raises(ValueError, match="tokenizer"):
        FusionBackbone()


def test_log_scale_gradient_reaches_parameter(backbone):
    backbone.logit_scale().backward()
    assert backbone.log_logit_scale.grad.item() == pytest.approx(
        math.exp(backbone.log_logit_scale.item()), rel=1e-5
    )


def test_mean_pooling_embeds_the_average_patch_token(make_backbone, batch):
    from vlp.platform.model.encoders import VisionConfig

    backbone = make_backbone(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=1, heads=2, pool="mean")
    )
    image = backbone.encode_image(batch["image"])
    expected = torch.nn.functional.normalize(backbone.vision_proj(image.tokens[:, 1:].mean(1)), dim=-1)
    torch.testing.assert_close(image.embedding, expected)


def test_text_mean_pooling_ignores_padding(make_backbone, batch):
    from vlp.platform.model.encoders import TextConfig

    backbone = make_backbone(text=TextConfig(width=32, depth=1, heads=2, max_len=48, pool="mean"))
    ids, mask = batch["input_ids"][:1], batch["attention_mask"][:1]
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=ids.dtype)], 1)
    padded_mask = torch.cat([mask, torch.zeros(1, 4, dtype=mask.dtype)], 1)
    plain = backbone.encode_text(ids, mask).embedding
    padded = backbone.encode_text(padded_ids, padded_mask).embedding
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)
