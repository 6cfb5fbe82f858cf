"""The flattened-batch gathers and group sums equal torch's per-element `gather` / `scatter_add` bit for bit, in
values and gradients (the unmerging ViT's merge and unmerge, grounding's patch grid and merged captions use
them)."""

from __future__ import annotations

import pytest
import torch

from vlp.platform.model.token_index import gather_tokens, sum_tokens
from vlp.platform.model.token_merging import bipartite_soft_matching, grouped_merge, merge_wavg


def expanded(index: torch.Tensor, channels: int) -> torch.Tensor:
    return index[..., None].expand(-1, -1, channels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_tokens_equals_gather_in_values_and_gradients(dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, generator=generator).to(dtype).requires_grad_()
    index = torch.randint(0, 7, (3, 11), generator=generator)  # repeats: gradients add up
    upstream = torch.randn(3, 11, 5, generator=generator).to(dtype)
    (ours,) = torch.autograd.grad(gather_tokens(x, index), x, upstream)
    (torchs,) = torch.autograd.grad(x.gather(1, expanded(index, 5)), x, upstream)
    assert torch.equal(gather_tokens(x, index), x.gather(1, expanded(index, 5)))
    assert torch.equal(ours, torchs)


def test_gather_tokens_reads_a_strided_input():
    x = torch.randn(4, 6, 3, 2).transpose(1, 2)[..., 0]  # [4, 3, 6] viewed, not contiguous
    index = torch.tensor([[2, 0], [1, 1], [0, 2], [2, 2]])
    assert torch.equal(gather_tokens(x, index), x.gather(1, expanded(index, 6)))


def test_sum_tokens_equals_scatter_add_and_leaves_unnamed_groups_zero():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 4, generator=generator, requires_grad=True)
    index = torch.tensor([[0, 0, 1, 3, 3, 3, 0, 1, 1], [2, 2, 2, 2, 2, 0, 0, 1, 1]])  # group 2 of row 0 empty
    upstream = torch.randn(2, 4, 4, generator=generator)
    reference = x.new_zeros(2, 4, 4).scatter_add(1, expanded(index, 4), x)
    ours = sum_tokens(x, index, 4)
    assert torch.equal(ours, reference)
    assert torch.equal(ours[0, 2], torch.zeros(4))
    (grad,) = torch.autograd.grad(ours, x, upstream)
    (reference_grad,) = torch.autograd.grad(reference, x, upstream)
    assert torch.equal(grad, reference_grad)


def test_grouped_merge_sums_and_unmerges_as_the_reference_ops():
    groups = torch.tensor([[0, 1, 1, 2, 0, 2], [0, 0, 1, 2, 2, 2]])
    x = torch.randn(2, 6, 3)
    merge, unmerge = grouped_merge(groups, 3)
    assert torch.equal(merge(x, mode="sum"), x.new_zeros(2, 3, 3).scatter_add(1, expanded(groups, 3), x))
    means = x.new_zeros(2, 3, 3).scatter_reduce(1, expanded(groups, 3), x, reduce="mean", include_self=False)
    assert torch.equal(merge(x), means)
    merged = torch.randn(2, 3, 3)
    assert torch.equal(unmerge(merged), merged.gather(1, expanded(groups, 3)))


def tome_merge_wavg(metric: torch.Tensor, x: torch.Tensor, size: torch.Tensor, r: int) -> tuple:
    """ToMe's matching (class token protected) and size-weighted merge in the form of its paper's code
    (facebookresearch/ToMe, tome/merge.py): per-element gather and scatter_reduce on the A / B halves."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    scores[..., 0, :] = -torch.inf
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx, src_idx = edge_idx[..., r:, :], edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)
    unm_idx = unm_idx.sort(dim=1)[0]

    def merge(t: torch.Tensor) -> torch.Tensor:
        src, dst = t[..., ::2, :], t[..., 1::2, :]
        n, t1, c = src.shape
        unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
        src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
        dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce="sum")
        return torch.cat([unm, dst], dim=1)

    merged_size = merge(size)
    return merge(x * size) / merged_size, merged_size


def test_bipartite_merge_by_rows_equals_tomes_scatter_reduce_bit_for_bit():
    """Three ToMe merges of a [CLS] + 64-token sequence (the merge config's vision blocks: r = 32, 16, 8), in
    values and gradients: rows moved whole sum in ToMe's order."""
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 65, 16, generator=generator, requires_grad=True)
    ours, theirs = (x0, None), (x0, torch.ones(4, 65, 1))
    for r in (32, 16, 8):
        metric = torch.randn(4, ours[0].shape[1], 8, generator=generator)
        merge, _ = bipartite_soft_matching(metric, r)
        ours = merge_wavg(merge, *ours)
        theirs = tome_merge_wavg(metric, *theirs, r)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    upstream = torch.randn(4, 9, 16, generator=generator)
    (grad,) = torch.autograd.grad(ours[0], x0, upstream)
    (reference,) = torch.autograd.grad(theirs[0], x0, upstream)
    assert torch.equal(grad, reference)
