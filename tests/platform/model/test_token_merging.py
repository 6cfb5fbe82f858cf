"""Token merging's matching, padding masks, proportional attention and ToMe's schedules
(vlp/platform/model/token_merging.py), against ToMe's own rules where it has them."""

import pytest
import torch
import torch.nn.functional as F

from vlp.platform.model.text_merging import merge_text_tokens
from vlp.platform.model.token_merging import (
    bipartite_soft_matching,
    merge_mask,
    merge_schedule,
    merge_source,
    merge_wavg,
    proportional_attention_bias,
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
