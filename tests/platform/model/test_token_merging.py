import copy

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer

from vlp.platform.model.token_merging import (
    MergingAttention,
    MergingBlock,
    apply_token_merging,
    bipartite_soft_matching,
    merge_groups,
    merge_mask,
    merge_schedule,
    merge_source,
    merge_text_tokens,
    merge_wavg,
    proportional_attention_bias,
    repeated_bipartite_matching,
    set_merge_r,
    text_guided_merge,
    token_merging_state,
)
from vlp.platform.run.flops import count_flops


def tiny_vit(depth: int = 3, **kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=depth,
        num_heads=2,
        num_classes=0,
        class_token=True,
        **kwargs,
    )


# --- bipartite soft matching and merging ---------------------------------------------------------


def test_r_zero_returns_the_input_objects_unchanged():
    x = torch.randn(2, 9, 4)
    merge, unmerge = bipartite_soft_matching(x, 0)
    assert merge(x) is x and unmerge(x) is x
    merged, size = merge_wavg(merge, x)
    assert merged is x and torch.equal(size, torch.ones(2, 9, 1))


def test_negative_r_is_rejected():
    with pytest.raises(ValueError, match="r must be >= 0"):
        bipartite_soft_matching(torch.randn(1, 4, 2), -1)


@pytest.mark.parametrize(("n", "protect_first", "expected"), [(9, True, 5), (8, False, 4), (2, True, 2)])
def test_r_is_capped_at_half_the_mergeable_tokens(n, protect_first, expected):
    x = torch.randn(2, n, 4)
    merge, _ = bipartite_soft_matching(x, 100, protect_first=protect_first)
    assert merge(x).shape == (2, expected, 4)


def test_merged_sizes_sum_to_the_token_count_over_repeated_merges():
    x, size = torch.randn(3, 17, 8), None
    for r in (4, 4, 3):
        merge, _ = bipartite_soft_matching(x, r)
        x, size = merge_wavg(merge, x, size)
    assert x.shape == (3, 6, 8)
    assert torch.equal(size.sum(dim=1), torch.full((3, 1), 17.0))


def test_merging_identical_tokens_keeps_their_value():
    x = torch.randn(1, 1, 6).expand(2, 9, 6).contiguous()
    merge, _ = bipartite_soft_matching(x, 4, protect_first=False)
    merged, size = merge_wavg(merge, x)
    torch.testing.assert_close(merged, x[:, :5])
    assert size.sum() == 18


def test_most_similar_pairs_merge_and_unmerge_restores_duplicates():
    # Tokens 2/3 and 6/7 are exact duplicates (A at even, B at odd positions); the rest are orthogonal.
    basis = torch.eye(8)
    x = basis[[0, 1, 2, 2, 4, 5, 6, 6]][None]
    merge, unmerge = bipartite_soft_matching(x, 2)
    merged, size = merge_wavg(merge, x)
    assert merged.shape == (1, 6, 8)
    assert torch.equal(unmerge(merged), x)
    assert sorted(size.flatten().tolist()) == [1, 1, 1, 1, 2, 2]


def test_protected_first_token_is_never_merged():
    x = torch.randn(2, 9, 4)
    x[:, 0] = x[:, 1]  # [CLS] identical to its B neighbour: the strongest link of all
    merge, _ = bipartite_soft_matching(x, 4)
    merged, size = merge_wavg(merge, x)
    assert torch.equal(merged[:, 0], x[:, 0]) and torch.equal(size[:, 0], torch.ones(2, 1))


def test_merge_source_maps_every_original_token_to_exactly_one_merged_token():
    x, size, source = torch.randn(2, 13, 4), None, None
    for r in (3, 3):
        merge, _ = bipartite_soft_matching(x, r)
        source = merge_source(merge, source, x)
        x, size = merge_wavg(merge, x, size)
    assert source.shape == (2, 7, 13)
    assert torch.equal(source.sum(dim=1), torch.ones(2, 13))


def test_merge_gradients_flow_to_every_token():
    x = torch.randn(2, 9, 4, requires_grad=True)
    merge, _ = bipartite_soft_matching(x, 4)
    merge_wavg(merge, x)[0].sum().backward()
    assert torch.all(x.grad != 0)


# --- padding masks ---------------------------------------------------------------------------------


def padded_batch():
    """Real tokens 0-4 distinct; padding 5-9 identical to each other AND to real token 4 in the metric."""
    metric = torch.randn(2, 10, 8)
    metric[:, 5:] = metric[:, 4:5]
    x = torch.zeros(2, 10, 3)
    x[:, :5, 0] = torch.arange(5.0)
    x[:, 5:, 1] = 1000.0  # padding's marker feature
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, :5] = True
    return metric, x, mask


def test_padding_never_wins_a_merge_into_a_real_token():
    metric, x, mask = padded_batch()
    merge, _ = bipartite_soft_matching(metric, 3)
    padding_share = merge_wavg(merge, x)[0][..., 1]
    assert ((padding_share > 0) & (padding_share < 1000)).any()  # unmasked, real token 4 joins padding
    merge, _ = bipartite_soft_matching(metric, 3, mask=mask)
    merged, size = merge_wavg(merge, x, mask=mask)
    merged_mask = merge_mask(merge, mask)
    assert torch.equal(merged_mask.sum(dim=1), torch.tensor([4, 4]))  # one real-real merge, two padding
    assert torch.all(merged[merged_mask][:, 1] == 0) and torch.all(merged[~merged_mask][:, 1] == 1000)
    assert torch.equal((size[..., 0] * merged_mask).sum(dim=1), torch.full((2,), 5.0))


def test_forced_cross_merge_still_keeps_padding_out_of_real_values():
    # One padding token at an even position has no padding partner in set B; r at its cap forces a link.
    metric = torch.randn(1, 7, 4)
    x = torch.zeros(1, 7, 2)
    x[0, :6, 0] = torch.randn(6)
    x[0, 6, 1] = 1000.0
    mask = torch.tensor([[True, True, True, True, True, True, False]])
    merge, _ = bipartite_soft_matching(metric, 3, mask=mask)
    merged, size = merge_wavg(merge, x, mask=mask)
    assert merged.shape == (1, 4, 2) and merge_mask(merge, mask).all()
    assert torch.all(merged[..., 1] == 0) and size.sum() == 6


def test_merge_text_tokens_keeps_mask_consistent_with_sizes():
    metric, x, mask = padded_batch()
    tokens, size, new_mask, unmerge = merge_text_tokens(x, 4, mask.long(), metric=metric)
    assert tokens.shape == (2, 6, 3) and new_mask.dtype == torch.long
    assert torch.equal(new_mask, new_mask.sort(dim=1, descending=True).values)  # real tokens first again
    assert unmerge(tokens).shape == x.shape
    assert torch.equal((size[..., 0] * new_mask).sum(dim=1), mask.sum(dim=1).float())
    assert torch.all(tokens[new_mask.bool()][:, 1] == 0) and torch.all(tokens[~new_mask.bool()][:, 1] == 1000)


# --- proportional attention ------------------------------------------------------------------------


def test_proportional_bias_with_unit_sizes_equals_plain_attention():
    q, k, v = torch.randn(3, 2, 4, 5, 8).unbind(0)
    bias = proportional_attention_bias(torch.ones(2, 5, 1))
    torch.testing.assert_close(
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias), F.scaled_dot_product_attention(q, k, v)
    )


def test_proportional_bias_equals_attending_to_duplicated_keys():
    q, k, v = torch.randn(3, 1, 2, 4, 8).unbind(0)
    size = torch.tensor([[1.0, 3.0, 1.0, 2.0]])
    bias = proportional_attention_bias(size)
    repeat = torch.tensor([0, 1, 1, 1, 2, 3, 3])
    expected = F.scaled_dot_product_attention(q, k[:, :, repeat], v[:, :, repeat])
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=bias), expected)


def test_proportional_bias_combines_with_a_key_padding_mask():
    q, k, v = torch.randn(3, 2, 2, 5, 8).unbind(0)
    keep = torch.tensor([[True, True, True, False, False], [True] * 5])
    bias = proportional_attention_bias(torch.ones(2, 5), key_padding_mask=keep)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=bias), expected)


# --- schedules -------------------------------------------------------------------------------------


def test_schedule_constant_list_and_decreasing():
    assert merge_schedule(2, 3, 17) == [2, 2, 2]
    assert merge_schedule([1, 0, 3], 3, 17) == [1, 0, 3]
    decreasing = merge_schedule(4, 5, 197, schedule="decreasing")
    assert decreasing == [8, 6, 4, 2, 0] and sum(decreasing) == 4 * 5


# ToMe's `parse_r(num_layers, r)` (facebookresearch/ToMe af95e4b, tome/utils.py) evaluated at these inputs:
# r or (r, inflection) -> tokens merged per layer; (16, -1) on ViT-B/16's 197 tokens leaves 197 - 187 = 10
TOME_PARSE_R = [
    (12, 16, [16] * 12),
    (12, (16, -1), [32, 29, 26, 23, 20, 17, 14, 11, 8, 5, 2, 0]),
    (12, (7, -1), [14, 12, 11, 10, 8, 7, 6, 5, 3, 2, 1, 0]),
    (12, (8, 0.5), [4, 4, 5, 6, 6, 7, 8, 9, 9, 10, 11, 12]),
    (12, (8, -0.5), [12, 11, 10, 9, 9, 8, 7, 6, 6, 5, 4, 4]),
    (12, (13, 1), [0, 2, 4, 7, 9, 11, 14, 16, 18, 21, 23, 26]),
    (3, (16, -1), [32, 16, 0]),
]


def tome_merged_per_block(parse_r: list[int], tokens: int = 197, protected: int = 1) -> list[int]:
    """What ToMe's blocks merge of `parse_r`: its matching caps r at half the mergeable tokens
    (`r = min(r, (t - protected) // 2)`, tome/merge.py)."""
    merged = []
    for r in parse_r:
        merged.append(min(r, (tokens - protected) // 2))
        tokens -= merged[-1]
    return merged


@pytest.mark.parametrize(("depth", "r", "parse_r"), TOME_PARSE_R)
def test_schedule_equals_tome_parse_r_with_its_truncation(depth, r, parse_r):
    r, inflection = r if isinstance(r, tuple) else (r, 0.0)
    expected = tome_merged_per_block(parse_r)
    assert merge_schedule(r, depth, 197, inflection=inflection) == expected
    if inflection == -1:
        assert merge_schedule(r, depth, 197, schedule="decreasing") == expected


def test_decreasing_schedule_keeps_tomes_ten_tokens_on_vit_b16():
    per_layer = merge_schedule(16, 12, 197, schedule="decreasing")
    assert 197 - sum(per_layer) == 10


def test_without_class_token_unmerged_tokens_stay_in_score_order_as_tomes():
    """ToMe (tome/merge.py, af95e4b) sorts the unmerged A tokens back into place only with a class token; at
    r = 1 on tokens 0..5 (A = 0, 2, 4; B = 1, 3, 5) whose best links score 4 -> 5: 0.99, 2 -> 3: 0.9,
    0 -> 1: 0.1, its merge gives [x2, x0, x1, x3, mean(x4, x5)]."""
    angle = torch.tensor(
        [0.0, 1.47, 1.0, 1.45, 2.0, 2.14]
    )  # cos(1.47) = 0.10, cos(0.45) = 0.90, cos(0.14) = 0.99
    metric = torch.stack([angle.cos(), angle.sin()], dim=-1)[None]
    x = torch.arange(6.0)[None, :, None]
    merge, unmerge = bipartite_soft_matching(metric, 1, protect_first=False)
    merged = merge(x, mode="mean")
    assert merged[0, :, 0].tolist() == [2.0, 0.0, 1.0, 3.0, 4.5]
    assert unmerge(merged)[0, :, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 4.5, 4.5]
    with_cls, _ = bipartite_soft_matching(metric, 1, protect_first=True)
    assert with_cls(x, mode="mean")[0, :2, 0].tolist() == [0.0, 2.0]  # [CLS] first, original order


def test_schedule_caps_so_tokens_never_drop_below_protected_plus_one():
    assert merge_schedule(100, 4, 17) == [8, 4, 2, 1]
    assert merge_schedule(100, 3, 2) == [0, 0, 0]


@pytest.mark.parametrize(
    ("r", "schedule", "message"),
    [
        (-1, "constant", "non-negative"),
        ([1, 2], "constant", "one entry per layer"),
        ([1, -1, 0], "constant", "non-negative"),
        (2, "linear", "schedule must be one of"),
        ([1, 1, 1], "decreasing", "explicit r list"),
    ],
)
def test_schedule_rejects_bad_input(r, schedule, message):
    with pytest.raises(ValueError, match=message):
        merge_schedule(r, 3, 17, schedule=schedule)
    with pytest.raises(ValueError, match="inflection must lie in"):
        merge_schedule(2, 3, 17, inflection=1.5)
    with pytest.raises(ValueError, match="is inflection -1"):
        merge_schedule(2, 3, 17, schedule="decreasing", inflection=0.5)


# --- timm vision tower -----------------------------------------------------------------------------


@pytest.mark.parametrize("fused_attn", [True, False])
@pytest.mark.parametrize("extra", [{}, {"qk_norm": True, "init_values": 0.1}])
def test_patched_vit_at_r_zero_is_bitwise_identical(fused_attn, extra):
    vit = tiny_vit(**extra)
    for block in vit.blocks:
        block.attn.fused_attn = fused_attn
    reference = copy.deepcopy(vit).eval()
    apply_token_merging(vit.eval(), 0)
    assert all(type(b) is MergingBlock and type(b.attn) is MergingAttention for b in vit.blocks)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(vit(x), reference(x))
    set_merge_r(vit, 3)
    assert not torch.equal(vit(x), reference(x))
    set_merge_r(vit, 0)
    assert torch.equal(vit(x), reference(x)) and vit._tome_state.size is None


@pytest.mark.parametrize("fused_attn", [True, False])
def test_merging_vit_reduces_tokens_and_tracks_sizes_and_source(fused_attn):
    vit = tiny_vit(qk_norm=True, init_values=0.1)
    for block in vit.blocks:
        block.attn.fused_attn = fused_attn
    apply_token_merging(vit, [3, 2, 2], trace_source=True)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    tokens = vit.forward_features(x)
    state = vit._tome_state
    assert tokens.shape == (2, 17 - 7, 32)
    assert torch.equal(state.size.sum(dim=1), torch.full((2, 1), 17.0))
    assert state.source.shape == (2, 10, 17) and torch.equal(state.source.sum(dim=1), torch.ones(2, 17))
    assert torch.equal(state.source[:, 0, 0], torch.ones(2))  # [CLS] stays first and alone
    assert torch.equal(state.groups, state.source.argmax(dim=1))  # the same map, as indices
    assert state.inputs.shape == (2, 17, 32)  # what entered the first block
    assert state.tokens_kept == pytest.approx(10 / 17)
    # each block's attention on the tokens that enter it, its MLP on those left after its merge
    assert state.block_tokens == [(17 + 14) / 2, (14 + 12) / 2, (12 + 10) / 2]
    tokens.sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is not None for p in vit.parameters() if p.requires_grad)


@pytest.mark.parametrize("proportional", [True, False])
def test_merging_exact_duplicates_is_lossless_only_with_proportional_attention(proportional):
    # Patch columns 0/1 and 2/3 (and their position embeddings) are twins: sequence positions 2j+2 (set A)
    # duplicate 2j+1 (set B), so layer 0 merges every twin pair; layer 1 then sees sizes of 2.
    vit = tiny_vit(depth=2).eval()
    reference = copy.deepcopy(vit)
    apply_token_merging(vit, [8, 0], proportional_attention=proportional)
    with torch.no_grad():
        for model in (vit, reference):
            model.pos_embed[:, 2::2] = model.pos_embed[:, 1::2]
    x = torch.randn(2, 3, 32, 32)
    x[..., 8:16], x[..., 24:32] = x[..., 0:8], x[..., 16:24]
    merged_cls, dense_cls = vit(x), reference(x)
    assert vit._tome_state.tokens_kept == pytest.approx(9 / 17)
    assert torch.allclose(merged_cls, dense_cls, atol=1e-5) == proportional


def test_fused_and_manual_attention_agree_when_merging():
    vit = tiny_vit()
    apply_token_merging(vit, 3)
    manual = copy.deepcopy(vit)
    for block in manual.blocks:
        block.attn.fused_attn = False
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vit.forward_features(x), manual.forward_features(x))


def test_merged_and_unmerged_vits_share_one_checkpoint():
    plain, merged = tiny_vit(), tiny_vit()
    apply_token_merging(merged, 4)
    assert list(plain.state_dict()) == list(merged.state_dict())
    merged.load_state_dict(plain.state_dict(), strict=True)
    plain.load_state_dict(merged.state_dict(), strict=True)


def test_deep_copied_vit_gets_its_own_merging_state():
    vit = tiny_vit()
    apply_token_merging(vit, 2)
    momentum = copy.deepcopy(vit)
    copied = token_merging_state(momentum)
    assert copied is not token_merging_state(vit) and all(b._tome_state is copied for b in momentum.blocks)
    set_merge_r(momentum, 0)
    assert token_merging_state(vit).r == [2, 2, 2]
    assert token_merging_state(tiny_vit()) is None


def test_apply_token_merging_rejects_unsupported_towers():
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        apply_token_merging(torch.nn.Linear(2, 2), 1)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        apply_token_merging(tiny_vit(reg_tokens=2), 1)
    with pytest.raises(ValueError, match="apply_token_merging first"):
        set_merge_r(tiny_vit(), 1)
    vit = tiny_vit()
    vit.blocks[0].__class__ = type("OtherBlock", (Block,), {})
    with pytest.raises(TypeError, match="block 0"):
        apply_token_merging(vit, 1)


def test_merging_lowers_vit_flops():
    vit = tiny_vit(depth=4)
    apply_token_merging(vit, 0)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        dense = count_flops(lambda: vit(x))
        set_merge_r(vit, 3)
        merged = count_flops(lambda: vit(x))
    assert 0 < merged < dense


def test_vit_b16_flop_ratio_at_r16_is_about_half(capsys):
    """ToMe reports ~0.5x FLOPs for ViT-B/16 at r=16; measured here: 0.4996 (35.13 -> 17.55 GFLOPs)."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=0)
    apply_token_merging(vit, 0)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        dense = count_flops(lambda: vit(x))
        set_merge_r(vit, 16)
        merged = count_flops(lambda: vit(x))
    ratio = merged / dense
    with capsys.disabled():
        print(f"\nViT-B/16 r=16 FLOPs: {dense / 1e9:.2f} G -> {merged / 1e9:.2f} G, ratio {ratio:.4f}")
    assert 0.45 < ratio < 0.55


# --- text-guided (PuMer) merging ----------------------------------------------------------------------


def test_text_guided_merge_merges_the_least_attended_tokens_first():
    image = torch.randn(1, 6, 4)
    attention = torch.tensor([0.3, 0.2, 0.01, 0.25, 0.2, 0.02]).expand(1, 2, 3, 6)  # [B, H, Nt, Ni]
    merged, size = text_guided_merge(image, attention, r=2)
    assert merged.shape == (1, 4, 4) and size.sum() == 6
    kept = [0, 1, 3, 4]
    singles = size[0, :, 0] == 1
    torch.testing.assert_close(merged[0][singles], image[0, kept][singles])


def test_text_guided_merge_ignores_padded_text_and_averages_into_most_similar():
    image = torch.eye(4)[None]
    image[0, 3] = torch.tensor([0.0, 0.9, 0.1, 0.0])  # token 3 is closest to token 1
    real_row = torch.tensor([0.4, 0.3, 0.25, 0.05])
    pad_row = torch.tensor([0.0, 0.0, 0.0, 1.0])  # padding attends only to token 3
    attention = torch.stack([real_row, pad_row])[None]  # [B, Nt, Ni]
    merged, size = text_guided_merge(image, attention, r=1, text_mask=torch.tensor([[1, 0]]))
    assert torch.equal(size[0, :, 0], torch.tensor([1.0, 2.0, 1.0]))
    torch.testing.assert_close(merged[0, 1], (image[0, 1] + image[0, 3]) / 2)


def test_text_guided_merge_protects_first_token_when_asked_and_rejects_bad_shapes():
    image = torch.randn(2, 5, 4)
    attention = torch.zeros(2, 3, 5)  # [CLS] least attended of all, yet protected
    attention[..., 1:] = 1.0
    merged, size = text_guided_merge(image, attention, r=10, protect_first=True)
    assert (
        merged.shape == (2, 2, 4)
        and torch.equal(merged[:, 0], image[:, 0])
        and torch.equal(size[:, 0, 0], torch.ones(2))
    )
    with pytest.raises(ValueError, match="cross_attn_weights"):
        text_guided_merge(image, torch.zeros(2, 3, 4), r=1)
    with pytest.raises(ValueError, match="text_mask"):
        text_guided_merge(image, attention, r=1, text_mask=torch.ones(2, 4))


# --- ToMe for Stable Diffusion's unmerging blocks (vision_unmerge) -------------------------------------


def group_means(x: torch.Tensor, groups: torch.Tensor, n: int) -> torch.Tensor:
    """x [B, N, C] averaged by groups [B, N] (indices < n) -> [B, n, C]."""
    index = groups[..., None].expand(-1, -1, x.shape[-1])
    return x.new_zeros(x.shape[0], n, x.shape[-1]).scatter_reduce(1, index, x, "mean", include_self=False)


def test_repeated_matching_merges_more_than_half_and_each_group_unmerges_to_its_members():
    x = torch.randn(2, 17, 8)
    merge, unmerge = repeated_bipartite_matching(x, 12)
    merged, size = merge_wavg(merge, x)
    assert merged.shape == (2, 5, 8) and torch.equal(size.sum(dim=1), torch.full((2, 1), 17.0))
    groups = merge_groups(unmerge, None, 5, merged)  # [B, 17]: each token's merged index
    assert torch.equal(groups[:, 0], torch.zeros(2, dtype=torch.long))  # [CLS] first and alone
    # a size-weighted average over the rounds is the plain mean of each group's tokens
    torch.testing.assert_close(merged, group_means(x, groups, 5))
    torch.testing.assert_close(unmerge(merged), merged.gather(1, groups[..., None].expand(-1, -1, 8)))
    torch.testing.assert_close(merge(x), merged)  # one scatter over the rounds: "mean" is the group's mean
    capped, _ = merge_wavg(repeated_bipartite_matching(x, 100)[0], x)
    assert capped.shape[1] == 2  # [CLS] and one more
    assert repeated_bipartite_matching(x, 0)[0](x) is x


def test_unmerging_schedule_counts_each_block_from_all_tokens():
    assert merge_schedule([8, 12, 15], 3, 17, from_all=True) == [8, 12, 15]
    assert merge_schedule([8, 12, 40], 3, 17, from_all=True) == [8, 12, 15]  # [CLS] and one more remain
    assert merge_schedule(8, 3, 17, from_all=True) == [8, 8, 8]
    assert merge_schedule(8, 3, 17) == [8, 4, 2]  # ToMe's blocks merge what the last one left


@pytest.mark.parametrize("fused_attn", [True, False])
def test_unmerging_vit_at_r_zero_is_bitwise_identical(fused_attn):
    vit = tiny_vit(qk_norm=True, init_values=0.1)
    for block in vit.blocks:
        block.attn.fused_attn = fused_attn
    reference = copy.deepcopy(vit).eval()
    apply_token_merging(vit.eval(), 0, unmerge=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(vit(x), reference(x)) and vit._tome_state.tokens is None


def test_unmerging_vit_keeps_every_token_and_merges_its_output_once():
    vit = tiny_vit(qk_norm=True, init_values=0.1)
    apply_token_merging(vit, [4, 8, 12], trace_source=True, unmerge=True)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = vit.forward_features(x)
    state = vit._tome_state
    assert out.shape == (2, 17 - 12, 32) and state.tokens.shape == (2, 17, 32)
    assert torch.equal(state.size.sum(dim=1), torch.full((2, 1), 17.0))
    assert torch.equal(state.groups, state.source.argmax(dim=1)) and torch.equal(
        state.groups[:, 0], torch.zeros(2).long()
    )
    # the output is the final norm of each group's size-weighted mean of the tokens it holds
    torch.testing.assert_close(out, vit.norm(group_means(state.tokens, state.groups, 5)))
    assert state.tokens_kept == pytest.approx(5 / 17)
    assert state.block_tokens == [17 - 4, 17 - 8, 17 - 12]  # attention and MLP on each block's merged tokens
    (out.sum() + state.tokens.sum()).backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is not None for p in vit.parameters() if p.requires_grad)
    assert not torch.equal(state.tokens[:, 1], state.tokens[:, 2])  # every patch its own token


def test_unmerging_vit_can_keep_its_output_whole():
    # merge_output False: the same blocks, nothing merged after the last: every token is the output, as in a
    # plain ViT ([B, 1 + N, C], no sizes), the final norm of the tokens the merged output is taken from
    vit = tiny_vit(qk_norm=True, init_values=0.1)
    apply_token_merging(vit, [4, 8, 12], unmerge=True)
    x = torch.randn(2, 3, 32, 32)
    vit.forward_features(x)
    every = vit._tome_state.tokens
    vit._tome_state.merge_output = False
    out = vit.forward_features(x)
    state = vit._tome_state
    assert out.shape == (2, 17, 32) and state.size is None and state.groups is None and state.tokens is None
    assert torch.equal(out, vit.norm(every)) and state.tokens_kept == 1.0


@pytest.mark.parametrize("proportional", [True, False])
def test_unmerging_exact_duplicates_equals_the_plain_vit_with_proportional_attention(proportional):
    # twins as in the ToMe test above: each block merges exactly the 8 twin pairs and gives both twins the
    # pair's update, so every patch's token (and each parameter's gradient) is the plain ViT's
    vit = tiny_vit(depth=2).eval()
    reference = copy.deepcopy(vit)
    apply_token_merging(vit, 8, proportional_attention=proportional, unmerge=True)
    with torch.no_grad():
        for model in (vit, reference):
            model.pos_embed[:, 2::2] = model.pos_embed[:, 1::2]
    x = torch.randn(2, 3, 32, 32)
    x[..., 8:16], x[..., 24:32] = x[..., 0:8], x[..., 16:24]
    weights = torch.randn(17, 32)
    vit.forward_features(x)
    every = vit.norm(vit._tome_state.tokens)
    dense = reference.forward_features(x)
    assert vit._tome_state.tokens_kept == pytest.approx(9 / 17)
    assert torch.allclose(every, dense, atol=1e-5) == proportional
    if proportional:
        (every * weights).sum().backward()
        (dense * weights).sum().backward()
        for (name, p), q in zip(vit.named_parameters(), reference.parameters(), strict=True):
            got, expected = p.grad, q.grad
            if name == "pos_embed":  # the two models agree while twins stay twins: on each pair's sum
                got, expected = (torch.cat([g[:, :1], g[:, 1::2] + g[:, 2::2]], 1) for g in (got, expected))
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=name)


def test_unmerge_can_be_switched_with_the_schedule():
    vit = tiny_vit()
    apply_token_merging(vit, [8, 12, 15], unmerge=True)
    assert token_merging_state(vit).r == [8, 12, 15]
    set_merge_r(vit, [8, 4, 2], unmerge=False)
    state = token_merging_state(vit)
    assert not state.unmerge and state.r == [8, 4, 2]
    vit(torch.randn(1, 3, 32, 32))
    assert state.tokens is None and state.size.shape[1] == 17 - 14
