"""Run a right-padded batch in a few groups of similar caption length, each trimmed to its own longest.

A batch pads every caption to the longest one (29 tokens in the default's batches, 21.5 on average), and
every per-token layer (projections, MLP, norms) pays for the padding. Sorting the rows by length and
running, say, four groups each cut to its longest skips most of it. Exact for any layer stack whose real
tokens read no padded key (key-padding masks, absolute positions): the same values and gradients at the
real positions; what padded positions hold differs (zeros past a group's length) and nothing may read it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

MAX_BUCKETS = 4
MIN_ROWS = 16  # fewer rows per group and the smaller matmuls cost more than the padding saved


def length_buckets(attention_mask: Tensor, max_buckets: int = MAX_BUCKETS, min_rows: int = MIN_ROWS) -> list:
    """[(row indices [Bk], length Lk)] of equal-count groups of rows sorted by length (mask [B, L])."""
    lengths = attention_mask.sum(dim=1)
    count = max(1, min(max_buckets, attention_mask.shape[0] // min_rows))
    if count == 1:
        return [(None, attention_mask.shape[1])]
    order = lengths.argsort(stable=True)
    return [(rows, int(lengths[rows].max())) for rows in order.tensor_split(count)]


def by_length(
    run: Callable[[Tensor | None, int], Tensor], attention_mask: Tensor, full_length: bool
) -> Tensor:
    """`run(rows, length)` -> [Bk, Lk or Q, ...] for each group (rows None = the whole batch uncut), put back
    in row order: [B, L, ...] (zero-padded past each group's length) when `full_length`, else [B, Q, ...]."""
    buckets = length_buckets(attention_mask)
    if len(buckets) == 1:
        return run(None, attention_mask.shape[1])
    width = attention_mask.shape[1]
    parts = []
    for rows, length in buckets:
        part = run(rows, length)
        if full_length:
            part = F.pad(part, (0, 0, 0, width - length))
        parts.append(part)
    inverse = torch.cat([rows for rows, _ in buckets]).argsort()
    return torch.cat(parts)[inverse]
