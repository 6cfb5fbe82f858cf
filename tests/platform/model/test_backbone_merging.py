from unittest import mock

import pytest
import torch

from vlp.platform.model import fusion as fusion_module
from vlp.platform.model import packing as packing_module
from vlp.platform.model.backbone import FusionBackbone
from vlp.platform.model.encoders import TextConfig, VisionConfig
from vlp.platform.model.fusion import FusionConfig
from vlp.platform.model.momentum import MomentumConfig
from vlp.platform.model.token_merging import TokenMergingConfig
from vlp.platform.model.vit_merging import token_merging_state
from vlp.platform.run.flops import count_flops

TOKENS = 1 + (32 // 8) ** 2  # [CLS] + 16 patches


def build(
    tokenizer,
    merging: TokenMergingConfig | None = None,
    fusion_depth: int = 2,
    momentum: MomentumConfig | None = None,
) -> FusionBackbone:
    torch.manual_seed(0)
    return FusionBackbone(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2),
        text=TextConfig(width=32, depth=1, heads=2, max_len=48),
        fusion=FusionConfig(depth=fusion_depth, heads=2),
        embed_dim=16,
        tokenizer=tokenizer,
        merging=merging,
        momentum=momentum,
    ).eval()


def run(backbone: FusionBackbone, batch: dict):
    image = backbone.encode_image(batch["image"])
    text = backbone.encode_text(batch["input_ids"], batch["attention_mask"])
    return image, backbone.fuse(image, text.tokens, text.attention_mask)


@pytest.mark.parametrize(
    "config",
    [
        TokenMergingConfig(),
        TokenMergingConfig(vision_r=[0, 0], schedule="constant", proportional_attention=False),
    ],
)
def test_zero_merging_is_bitwise_identical_to_no_merging(shapes, batch, config):
    plain_image, plain_fused = run(build(shapes.tokenizer), batch)
    image, fused = run(build(shapes.tokenizer, config), batch)
    assert image.sizes is None
    assert torch.equal(image.tokens, plain_image.tokens) and torch.equal(
        image.embedding, plain_image.embedding
    )
    assert torch.equal(fused, plain_fused)


def test_vision_merging_sizes_sum_to_the_token_count(shapes, batch):
    backbone = build(shapes.tokenizer, TokenMergingConfig(vision_r=3))
    image, fused = run(backbone, batch)
    assert image.tokens.shape[1] == TOKENS - 2 * 3 and image.sizes.shape == image.tokens.shape[:2]
    assert torch.equal(image.sizes.sum(dim=1), torch.full((8,), float(TOKENS)))
    assert backbone.tokens_kept == pytest.approx((TOKENS - 6) / TOKENS)
    assert fused.shape == batch["input_ids"].shape + (32,)


def test_fusion_merging_sizes_sum_to_the_token_count_in_every_layer(shapes, batch):
    backbone = build(shapes.tokenizer, TokenMergingConfig(vision_r=2, fusion_r=3, text_r=2), fusion_depth=3)
    merges, original = [], fusion_module.text_guided_merge

    def recording(*args, **kwargs):
        merges.append(original(*args, **kwargs))
        return merges[-1]

    with mock.patch.object(fusion_module, "text_guided_merge", side_effect=recording):
        _, fused = run(backbone, batch)
    assert [tokens.shape[1] for tokens, _ in merges] == [TOKENS - 4 - 3, TOKENS - 4 - 6]  # not after the last
    for _, size in merges:
        assert torch.equal(size.sum(dim=(1, 2)), torch.full((8,), float(TOKENS)))
    assert fused.shape == batch["input_ids"].shape + (32,) and torch.isfinite(fused).all()


def padded_and_trimmed(backbone: FusionBackbone, batch: dict):
    """Each caption fused inside the padded batch vs alone without padding: [(padded, alone)] per row."""
    image = backbone.encode_image(batch["image"])
    text = backbone.encode_text(batch["input_ids"], batch["attention_mask"])
    tokens, mask = text.tokens.clone(), text.attention_mask
    tokens[mask == 0] = 10 * torch.randn(tokens.shape[-1])  # identical padding: its pairs match best
    fused = backbone.fuse(image, tokens, mask)
    pairs = []
    for i, length in enumerate(mask.sum(dim=1).tolist()):
        alone = backbone.fuse(
            image.take(torch.tensor([i])), tokens[i : i + 1, :length], mask[i : i + 1, :length]
        )
        pairs.append((fused[i, :length], alone[0]))
    return pairs


@pytest.mark.parametrize("text_r, text_entry_r", [(0, 0), (3, 0), (0, 4), (2, 3)])
def test_fusion_merging_never_depends_on_padded_text(shapes, batch, text_r, text_entry_r):
    assert (batch["attention_mask"] == 0).any()  # the batch has padded captions
    merging = TokenMergingConfig(vision_r=2, fusion_r=4, text_r=text_r, text_entry_r=text_entry_r)
    backbone = build(shapes.tokenizer, merging, fusion_depth=3)
    with torch.no_grad():
        for padded, alone in padded_and_trimmed(backbone, batch):
            torch.testing.assert_close(padded, alone, atol=2e-5, rtol=1e-4)


def test_fusion_merging_changes_the_result_only_when_switched_on(shapes, batch):
    backbone = build(shapes.tokenizer)
    with torch.no_grad():
        _, plain = run(backbone, batch)
        with backbone.merging_override(fusion_r=6):
            _, merged = run(backbone, batch)
    assert not torch.allclose(plain, merged)


def test_merged_and_unmerged_backbones_share_one_checkpoint(shapes, batch):
    merged = build(shapes.tokenizer, TokenMergingConfig(vision_r=3, fusion_r=2, text_r=2))
    plain = build(shapes.tokenizer)
    assert list(merged.state_dict()) == list(plain.state_dict())
    with torch.no_grad():
        for p in merged.parameters():
            p.add_(0.01 * torch.randn_like(p))
    plain.load_state_dict(merged.state_dict(), strict=True)
    merged.load_state_dict(plain.state_dict(), strict=True)
    _, plain_fused = run(plain, batch)
    with merged.merging_override(vision_r=0, fusion_r=0, text_r=0):
        _, unmerged_fused = run(merged, batch)
    assert torch.equal(plain_fused, unmerged_fused)


def test_set_merging_returns_the_previous_setting_and_override_restores_it(shapes, batch):
    backbone = build(shapes.tokenizer, TokenMergingConfig(vision_r=2))
    previous = backbone.set_merging(vision_r=3)
    assert previous == TokenMergingConfig(vision_r=2) and backbone.merging.vision_r == 3
    with backbone.merging_override(vision_r=0) as inside:
        assert inside.vision_r == 0 and backbone.encode_image(batch["image"]).sizes is None
    assert backbone.merging == TokenMergingConfig(vision_r=3)
    assert backbone.encode_image(batch["image"]).tokens.shape[1] == TOKENS - 6


def test_bad_merging_settings_are_rejected(shapes):
    backbone = build(shapes.tokenizer)
    with pytest.raises(ValueError, match="either a merging config or field changes"):
        backbone.set_merging(TokenMergingConfig(), vision_r=1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        backbone.set_merging(fusion_depth=1)
    with pytest.raises(ValueError, match="merging.fusion_r"):
        TokenMergingConfig(fusion_r=-1)
    with pytest.raises(ValueError, match="merging.schedule"):
        TokenMergingConfig(schedule="linear")
    with pytest.raises(ValueError, match="merging.vision_entry_r .*merging.vision_unmerge"):
        TokenMergingConfig(vision_r=4, vision_entry_r=4, vision_unmerge=True)
    with pytest.raises(ValueError, match="merging.vision_entry_r"):
        TokenMergingConfig(vision_entry_r=-2)
    with pytest.raises(ValueError, match="vision_merge_output: false .*merging.vision_unmerge: true"):
        TokenMergingConfig(vision_r=4, vision_merge_output=False)  # ToMe's blocks keep no token per patch
    with pytest.raises(ValueError, match="one entry per layer"):
        backbone.set_merging(vision_r=[1, 2, 3])


def test_switching_merging_switches_the_momentum_copy_too(shapes, batch):
    """The momentum model is a copy taken at construction; a later setting (a schedule raising r, evaluation
    under `merging_override`) reaches its ViT as well, so both encode the batch alike."""
    backbone = build(shapes.tokenizer, TokenMergingConfig(vision_r=2), momentum=MomentumConfig())
    copy = backbone.momentum.backbone
    assert copy.encode_image(batch["image"]).tokens.shape[1] == TOKENS - 4
    backbone.set_merging(vision_r=[6, 8], vision_unmerge=True)
    assert copy.merging == backbone.merging and token_merging_state(copy.vision.vit).r == [6, 8]
    with backbone.merging_override(vision_r=0, vision_unmerge=False):
        assert copy.encode_image(batch["image"]).tokens.shape[1] == TOKENS
    assert copy.encode_image(batch["image"]).tokens.shape[1] == TOKENS - 8
    assert torch.equal(copy.encode_image(batch["image"]).tokens, backbone.encode_image(batch["image"]).tokens)


def test_merging_lowers_backbone_flops(shapes, batch, monkeypatch):
    # merged and unmerged on the same padded batch: merging inside fusion runs padded, packing
    # (vlp.platform.model.packing) would drop the unmerged pass's padding rows besides
    monkeypatch.setattr(packing_module, "MIN_PADDING", 2.0)
    backbone = build(shapes.tokenizer)
    text = backbone.encode_text(batch["input_ids"], batch["attention_mask"])

    def costs() -> tuple[int, int]:
        image = backbone.encode_image(batch["image"])
        return (
            count_flops(lambda: backbone.encode_image(batch["image"])),
            count_flops(lambda: backbone.fuse(image, text.tokens, text.attention_mask)),
        )

    with torch.no_grad():
        vision, fusion = costs()
        with backbone.merging_override(vision_r=4):
            merged_vision, vision_merged_fusion = costs()
        with backbone.merging_override(vision_r=4, fusion_r=4):
            _, merged_fusion = costs()
    assert merged_vision < 0.8 * vision
    assert merged_fusion < vision_merged_fusion < fusion


def test_per_token_callers_can_opt_out_of_text_merging(shapes, batch):
    backbone = build(shapes.tokenizer, TokenMergingConfig(vision_r=2, fusion_r=3, text_r=4))
    image = backbone.encode_image(batch["image"])
    text = backbone.encode_text(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        per_token = backbone.fuse(image, text.tokens, text.attention_mask, merge_text=False)
        merged = backbone.fuse(image, text.tokens, text.attention_mask)
        with backbone.merging_override(text_r=0):
            reference = backbone.fuse(image, text.tokens, text.attention_mask)
    assert torch.equal(per_token, reference) and not torch.allclose(merged, reference)
    assert backbone.merging.text_r == 4
    with backbone.merging_override(text_entry_r=5), torch.no_grad():
        assert torch.equal(
            backbone.fuse(image, text.tokens, text.attention_mask, merge_text=False), reference
        )


def duplicated_captions(backbone: FusionBackbone, batch: dict, r: int) -> tuple:
    """The batch's captions with tokens 2k and 2k + 1 (k = 1..r) made equal: ToMe's matching pairs exactly
    those (cosine 1), so a merge of r loses nothing when merged tokens are attended in proportion to size."""
    text = backbone.encode_text(batch["input_ids"], batch["attention_mask"])
    tokens = text.tokens.clone()
    for k in range(1, r + 1):
        tokens[:, 2 * k + 1] = tokens[:, 2 * k]
    mask = torch.ones_like(text.attention_mask)  # every token real, so the pairs are real-real links
    return tokens, mask


def test_entry_merging_of_duplicate_tokens_equals_the_unmerged_caption(shapes, batch):
    """ToMe's proportional attention: a token of size 2 is attended as the two equal tokens it replaced, so
    merging exact duplicates at the fusion's entry changes no output, at every position (each takes its
    group's value) and in ITM's shared path (merge, first self-attention, fuse with sizes)."""
    r = 5
    backbone = build(
        shapes.tokenizer, TokenMergingConfig(vision_r=2, text_entry_r=r), fusion_depth=2
    ).double()
    batch = {**batch, "image": batch["image"].double()}
    with torch.no_grad():
        image = backbone.encode_image(batch["image"])
        tokens, mask = duplicated_captions(backbone, batch, r)
        unmerged = backbone.fuse(image, tokens, mask, merge_text=False)
        merged = backbone.fuse(image, tokens, mask)
        caption = backbone.merge_caption(tokens, mask)
        attended = backbone.first_self_attention(caption.tokens, caption.mask, caption.size[..., 0])
        cls = torch.zeros(len(mask), 1, dtype=torch.long)
        shared = backbone.fuse(
            image, attended, caption.mask, positions=cls, self_attended=True, text_sizes=caption.size[..., 0]
        )
        assert caption.tokens.shape[1] == mask.shape[1] - r and caption.size.max() == 2
        torch.testing.assert_close(merged, unmerged, atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(shared[:, 0], unmerged[:, 0], atol=1e-8, rtol=1e-8)
        with backbone.merging_override(proportional_attention=False):  # without it the merge shows
            assert not torch.allclose(backbone.fuse(image, tokens, mask), unmerged, atol=1e-6)


def test_entry_merging_lowers_fusion_flops(shapes, batch, monkeypatch):
    monkeypatch.setattr(packing_module, "MIN_PADDING", 2.0)
    backbone = build(shapes.tokenizer)
    with torch.no_grad():
        image = backbone.encode_image(batch["image"])
        text = backbone.encode_text(batch["input_ids"], batch["attention_mask"])
        full = count_flops(lambda: backbone.fuse(image, text.tokens, text.attention_mask))
        with backbone.merging_override(text_entry_r=6):
            merged = count_flops(lambda: backbone.fuse(image, text.tokens, text.attention_mask))
    length = text.attention_mask.shape[1]
    assert merged < full * (length - 5) / length


@pytest.mark.parametrize("entry_r", [0, 6])
@pytest.mark.parametrize("detail", ["positions", "inputs"])
def test_patch_grid_gives_each_patch_its_merged_token_and_its_place(shapes, batch, detail, entry_r):
    """Grounding's view of a merged image: position j holds the token its patch went to (ToMe's source map,
    the entry merge's included) plus position embedding j (or the token that entered the ViT at j); keys and
    values taken from the merged tokens' by linearity equal those projected from the grid itself, and so do
    the fused outputs and every gradient (float64)."""
    merging = TokenMergingConfig(
        vision_r=3 if entry_r == 0 else [2, 1], vision_entry_r=entry_r, trace_source=True
    )
    backbone = build(shapes.tokenizer, merging).double()
    images = batch["image"].double()
    image = backbone.encode_image(images)
    vit = backbone.vision.vit
    source = vit._tome_state.source  # [B, N', 1 + N] 0/1
    grid = backbone.patch_grid(image, detail)
    inputs = torch.cat([vit.cls_token.expand(8, -1, -1), vit.patch_embed(images)], dim=1) + vit.pos_embed
    added = vit.pos_embed if detail == "positions" else inputs
    assert torch.allclose(image.grid.inputs, inputs, atol=1e-12)
    assert grid.tokens.shape == (8, TOKENS, 32) and grid.sizes is None and grid.grid is None
    assert torch.allclose(grid.tokens, source.transpose(1, 2) @ image.tokens + added, atol=1e-12)

    text = backbone.encode_text(batch["input_ids"], batch["attention_mask"])
    outputs, grads = [], []
    for via_linearity in (True, False):
        backbone.zero_grad()
        image = backbone.encode_image(images)
        grid = (
            backbone.patch_grid(backbone.with_fusion_keys(image), detail)
            if via_linearity
            else backbone.with_fusion_keys(backbone.patch_grid(image, detail))
        )
        fused = backbone.fuse(grid, text.tokens.detach(), text.attention_mask)
        (fused * torch.linspace(-1, 1, fused.shape[-1], dtype=fused.dtype)).sum().backward()
        outputs.append(fused.detach())
        grads.append({n: p.grad.clone() for n, p in backbone.named_parameters() if p.grad is not None})
    assert torch.allclose(outputs[0], outputs[1], atol=1e-12)
    assert grads[0].keys() == grads[1].keys()
    assert {"fusion.layers.0.cross_attn.key_value.bias", "vision.vit.pos_embed"} <= grads[0].keys()
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-10), name


def test_patch_grid_leaves_unmerged_and_patch_dropped_images_alone(shapes, batch):
    """Without vision merging there is nothing to put back; under patch dropout the tokens are not the
    patch grid, so no grid is kept (grounding's all-patch pass has one)."""
    plain = build(shapes.tokenizer)
    image = plain.encode_image(batch["image"])
    assert image.grid is None and plain.patch_grid(image) is image
    backbone = build(shapes.tokenizer, TokenMergingConfig(vision_r=2))
    backbone.vision.set_patch_dropout(0.5)
    backbone.train()
    assert backbone.encode_image(batch["image"]).grid is None
    all_patches = backbone.encode_image(batch["image"], all_patches=True)
    assert all_patches.grid.groups.shape == (8, TOKENS)
    assert backbone.patch_grid(all_patches).tokens.shape[1] == TOKENS
    cut, picked = all_patches.rows(3), all_patches.take(torch.tensor([2, 2]))
    for part, rows in ((cut, slice(0, 3)), (picked, [2, 2])):
        assert torch.equal(part.grid.groups, all_patches.grid.groups[rows])
        assert torch.equal(part.grid.inputs, all_patches.grid.inputs[rows])
    with pytest.raises(ValueError, match="positions"):
        backbone.patch_grid(all_patches, "pixels")


def test_entry_merging_runs_under_patch_dropout_on_the_kept_patches(shapes, batch):
    """Patch dropout keeps 8 of the 16 patches in training; the entry merge then merges among the kept tokens
    (matched on the tokens themselves: the kept patches' embeddings are not at hand) and keeps no grid."""
    backbone = build(shapes.tokenizer, TokenMergingConfig(vision_entry_r=4))
    backbone.vision.set_patch_dropout(0.5)
    backbone.train()
    image = backbone.encode_image(batch["image"])
    assert image.tokens.shape[1] == 1 + 8 - 4 and image.grid is None
    assert torch.equal(image.sizes.sum(dim=1), torch.full((8,), 9.0))
    everything = backbone.encode_image(batch["image"], all_patches=True)
    assert everything.tokens.shape[1] == TOKENS - 4 and everything.grid.groups.shape == (8, TOKENS)


def test_unmerging_vision_keeps_every_patch_for_the_tokens_grid(shapes, batch):
    """With blocks that unmerge (`vision_unmerge`), the image's tokens are the output merged once (17 -> 3 here)
    and the grid keeps every patch's own token: `patch_grid(image, "tokens")` is the ViT's final norm of
    those, which the fusion reads like any image ([CLS] first); `rows`/`take` carry them."""
    merging = TokenMergingConfig(vision_r=[6, 14], vision_unmerge=True)
    backbone = build(shapes.tokenizer, merging)
    image = backbone.encode_image(batch["image"])
    vit = backbone.vision.vit
    every = image.grid.tokens
    assert image.tokens.shape == (8, TOKENS - 14, 32) and every.shape == (8, TOKENS, 32)
    assert torch.equal(image.sizes.sum(dim=1), torch.full((8,), float(TOKENS)))
    assert backbone.tokens_kept == pytest.approx((TOKENS - 14) / TOKENS)
    # each block's attention and MLP run on its merged tokens: 17 - 6, then 17 - 14, of 17 through 2 blocks
    assert backbone.token_blocks_kept == pytest.approx((TOKENS - 6 + TOKENS - 14) / (2 * TOKENS))
    grid = backbone.patch_grid(image, "tokens")
    assert grid.grid is None and grid.sizes is None and grid.fusion_kv is None
    assert torch.equal(grid.tokens, vit.norm(every)) and torch.equal(grid.embedding, image.embedding)
    text = backbone.encode_text(batch["input_ids"], batch["attention_mask"])
    fused = backbone.fuse(grid, text.tokens, text.attention_mask)
    keyed = backbone.fuse(backbone.with_fusion_keys(grid), text.tokens, text.attention_mask)
    assert fused.shape == batch["input_ids"].shape + (32,) and torch.allclose(fused, keyed, atol=1e-6)
    picked = image.take(torch.tensor([2, 2]))
    assert torch.equal(picked.grid.tokens, every[[2, 2]]) and torch.equal(
        image.rows(3).grid.tokens, every[:3]
    )
    # ToMe's blocks keep no token per patch; the tokens grid says what to set
    tome = build(shapes.tokenizer, TokenMergingConfig(vision_r=2))
    tome_image = tome.encode_image(batch["image"])
    assert tome_image.grid.tokens is None and tome_image.take(torch.tensor([1])).grid.tokens is None
    with pytest.raises(ValueError, match="vision_unmerge"):
        tome.patch_grid(tome_image, "tokens")
    # with the output kept whole, every reader gets those tokens as a plain image (no grid to put back)
    backbone.set_merging(vision_merge_output=False)
    whole = backbone.encode_image(batch["image"])
    assert whole.grid is None and whole.sizes is None and backbone.tokens_kept == 1.0
    assert backbone.token_blocks_kept == pytest.approx((TOKENS - 6 + TOKENS - 14) / (2 * TOKENS))  # the same
    assert torch.equal(whole.tokens, grid.tokens) and backbone.patch_grid(whole, "tokens") is whole
    backbone.set_merging(vision_merge_output=True)
    # and the same backbone switched back to ToMe's blocks merges what each block left
    backbone.set_merging(vision_r=[4, 2], vision_unmerge=False)
    assert backbone.encode_image(batch["image"]).tokens.shape[1] == TOKENS - 6
