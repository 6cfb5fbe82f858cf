"""Per-row token gathers and group sums, each one `index_select` / `index_add` over the flattened batch.

`x.gather(1, index[..., None].expand(-1, -1, C))` and its backward, `scatter_add`, read an index as large as
their output, one element at a time; on CPU they take three to four times as long as the same rows moved whole
by `index_select` / `index_add` over [B * N, C] (benchmarks/results/2026-12-05-epyc-2cpu-token-gathers.md).
The values are the same bit for bit: each output row is a copy, or its members summed in ascending order, as
`scatter_add` sums them.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _flat_index(index: Tensor, rows: int) -> Tensor:
    """index [B, M] into each row's N tokens -> [B * M] into the flattened [B * N] tokens."""
    offsets = torch.arange(index.shape[0], device=index.device)[:, None] * rows
    return (index + offsets).reshape(-1)


def gather_tokens(x: Tensor, index: Tensor) -> Tensor:
    """x [B, N, C] reordered along N by index [B, M] (repeats allowed) -> [B, M, C]."""
    b, n, c = x.shape
    return x.reshape(b * n, c).index_select(0, _flat_index(index, n)).view(b, index.shape[1], c)


def sum_tokens(x: Tensor, index: Tensor, groups: int) -> Tensor:
    """x [B, N, C] summed into `groups` tokens per row by index [B, N] (each token's group) -> [B, groups, C];
    a group no token names is zero."""
    b, n, c = x.shape
    out = x.new_zeros(b * groups, c).index_add(0, _flat_index(index, groups), x.reshape(b * n, c))
    return out.view(b, groups, c)
