"""A timm ViT whose blocks merge (vlp/platform/model/vit_merging.py): ToMe's blocks and ToMe for Stable
Diffusion's unmerging ones, bitwise the plain ViT at r = 0, one checkpoint for both."""

import copy

import pytest
import torch
from timm.models.vision_transformer import Block, VisionTransformer

from vlp.platform.model.token_merging import (
    merge_groups,
    merge_schedule,
    merge_wavg,
    repeated_bipartite_matching,
)
from vlp.platform.model.vit_merging import (
    ENTRY_ROUND_SHARE,
    MergingAttention,
    MergingBlock,
    apply_token_merging,
    set_merge_r,
    token_merging_state,
)
from vlp.platform.run.flops import count_flops


def tiny_vit(depth: int = 3, class_token: bool = True, **kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=depth,
        num_heads=2,
        num_classes=0,
        class_token=class_token,
        global_pool="token" if class_token else "avg",
        **kwargs,
    )


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


def flops_plain_and_merged(vit: VisionTransformer, image_size: int, r: int) -> tuple[int, int]:
    """FLOPs of one image through `vit` unmerged and at `r` (the same weights, patched in place)."""
    apply_token_merging(vit, 0)
    x = torch.randn(1, 3, image_size, image_size)
    with torch.no_grad():
        dense = count_flops(lambda: vit(x))
        set_merge_r(vit, r)
        return dense, count_flops(lambda: vit(x))


def test_merging_lowers_vit_flops():
    dense, merged = flops_plain_and_merged(tiny_vit(depth=4), 32, 3)
    assert 0 < merged < dense


def test_vit_b16_flop_ratio_at_r16_is_about_half(capsys):
    """ToMe reports about 0.5x the FLOPs for ViT-B/16 at r = 16."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, num_classes=0)
    dense, merged = flops_plain_and_merged(vit, 224, 16)
    ratio = merged / dense
    with capsys.disabled():
        print(f"\nViT-B/16 r=16 FLOPs: {dense / 1e9:.2f} G -> {merged / 1e9:.2f} G, ratio {ratio:.4f}")
    assert 0.45 < ratio < 0.55


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


# --- merging as the image enters -----------------------------------------------------------------------


def test_entry_merging_runs_every_block_on_fewer_tokens_and_tracks_sizes_and_source():
    vit = tiny_vit()
    apply_token_merging(vit, [2, 1, 0], trace_source=True, entry_r=6)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    tokens = vit.forward_features(x)
    state = vit._tome_state
    assert tokens.shape == (2, 17 - 6 - 3, 32) and state.r == [2, 1, 0]
    assert torch.equal(state.size.sum(dim=1), torch.full((2, 1), 17.0))
    assert state.source.shape == (2, 8, 17) and torch.equal(state.source.sum(dim=1), torch.ones(2, 17))
    assert torch.equal(state.source[:, 0, 0], torch.ones(2))  # [CLS] stays first and alone
    assert torch.equal(state.groups, state.source.argmax(dim=1))
    assert state.inputs.shape == (2, 17, 32)  # every token as it came, before the entry merge
    assert state.block_tokens == [(11 + 9) / 2, (9 + 8) / 2, 8.0]
    tokens.sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is not None for p in vit.parameters() if p.requires_grad)
    set_merge_r(vit, 0, entry_r=0)
    reference = tiny_vit()
    assert torch.equal(vit(x), reference(x)) and state.size is None and state.patch_tokens is None


@pytest.mark.parametrize("proportional", [True, False])
def test_entry_merging_patches_that_show_the_same_equals_the_plain_vit_with_proportional_attention(
    proportional,
):
    """A plain image without position embeddings: every patch token is the same, so the 16 merge into one of
    size 16, which attention weighs as the 16 it holds (exact only with proportional attention)."""
    vit = tiny_vit().eval()
    with torch.no_grad():
        vit.pos_embed.zero_()
    reference = copy.deepcopy(vit)
    apply_token_merging(vit, 0, proportional_attention=proportional, entry_r=15)
    x = torch.randn(2, 3, 1, 1).expand(2, 3, 32, 32)
    merged_cls, dense_cls = vit(x), reference(x)
    assert vit._tome_state.tokens_kept == pytest.approx(2 / 17)
    assert torch.allclose(merged_cls, dense_cls, atol=1e-5) == proportional


@pytest.mark.parametrize("class_token", [True, False])
def test_entry_merging_reads_what_the_patches_show_not_where_they_lie(class_token):
    """The entry merge's plan does not move with the position embeddings (it reads the patch embeddings),
    while the same matching on the tokens with their positions does; with a class token or without one."""
    vit = tiny_vit(class_token=class_token).eval()
    apply_token_merging(vit, 0, entry_r=8)
    x = torch.randn(2, 3, 32, 32)
    plans = []
    for std in (0.02, 2.0):
        with torch.no_grad():
            vit.pos_embed.normal_(std=std)
            vit(x)
            positioned = vit._pos_embed(vit.patch_embed(x))
        _, unmerge = repeated_bipartite_matching(positioned, 8, class_token, ENTRY_ROUND_SHARE)
        left = positioned.shape[1] - 8
        plans.append((vit._tome_state.groups, merge_groups(unmerge, None, left, positioned)))
    (content, placed), (content_moved, placed_moved) = plans
    assert torch.equal(content, content_moved) and not torch.equal(placed, placed_moved)


def test_repeated_matching_in_smaller_rounds_merges_only_the_strongest_links():
    """12 copies of one token and 4 distinct ones, merged by 10: rounds of half the tokens (every token of
    set A merges in the first) merge distinct tokens into others; rounds of a quarter leave the 4 apart."""
    torch.manual_seed(0)
    x = torch.randn(1, 17, 16)
    distinct = [2, 6, 11, 14]
    copies = [i for i in range(1, 17) if i not in distinct]
    x[:, copies] = x[:, 1:2].clone()
    for share, apart in ((0.5, False), (0.25, True)):
        _, unmerge = repeated_bipartite_matching(x, 10, round_share=share)
        groups = merge_groups(unmerge, None, 7, x)[0]
        alone = all((groups == groups[i]).sum() == 1 for i in distinct)
        assert alone == apart, share


def test_entry_merging_counts_the_schedule_from_the_tokens_left_and_excludes_unmerging_blocks():
    vit = tiny_vit()
    apply_token_merging(vit, 8, entry_r=6)
    assert token_merging_state(vit).r == merge_schedule(8, 3, 11)
    with pytest.raises(ValueError, match="entry merging .* unmerge"):
        apply_token_merging(tiny_vit(), 4, unmerge=True, entry_r=2)
    with pytest.raises(ValueError, match="entry merging .* unmerge"):
        set_merge_r(vit, 4, unmerge=True)
    with pytest.raises(ValueError, match="entry_r must be a non-negative integer"):
        set_merge_r(vit, 4, entry_r=-1)


def test_deep_copied_vit_reads_its_own_patch_embedding():
    """The momentum model is a deep copy: its patch embedding's hook fills the copy's state, not the
    original's."""
    vit = tiny_vit()
    apply_token_merging(vit, 0, entry_r=4)
    momentum = copy.deepcopy(vit)
    (hook,) = momentum.patch_embed._forward_hooks.values()
    assert hook.args[0] is token_merging_state(momentum) is not token_merging_state(vit)
    assert momentum(torch.randn(1, 3, 32, 32)).shape == vit(torch.randn(1, 3, 32, 32)).shape
