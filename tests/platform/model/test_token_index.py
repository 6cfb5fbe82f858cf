"""The flattened-batch gathers and group sums equal torch's per-element `gather` / `scatter_add` bit for bit, in
values and gradients (the unmerging ViT's merge and unmerge, grounding's patch grid and merged captions use
them)."""

from __future__ import annotations

import pytest
import torch

from vlp.platform.model.token_index import gather_tokens, sum_tokens
from vlp.platform.model.token_merging import grouped_merge


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
