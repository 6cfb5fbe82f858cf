"""Run a right-padded batch in a few groups of similar caption length, each trimmed to its own longest.

A batch pads every caption to the longest one (29 tokens in the default's batches, 21.5 on average), and
every per-token layer (projections, MLP, norms) pays for the padding. Sorting the rows by length and
running, say, four groups each cut to its longest skips most of it, once the batch is large enough that a
group's matmuls outweigh the cost of running more passes (`MIN_ROWS`). Exact for any layer stack whose real
tokens read no padded key (key-padding masks, absolute positions): the same values and gradients at the
real positions; what padded positions hold differs (zeros past a group's length) and nothing may read it.
The inputs are put in length order once and split into contiguous groups, so the backward pass scatters
each input's gradient once (not once per group into a zero tensor of the whole batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# Private API (torch 2.14.1, tests/test_private_apis.py): torch has no public pytree for nested outputs of
# tensors yet
from torch.utils._pytree import tree_flatten, tree_unflatten

MAX_BUCKETS = 4
# The fewest rows a group holds: with fewer, the per-op cost of more, smaller passes outweighs the padding
# they save (timings: benchmarks/results/2026-12-02-epyc-2cpu-make-train.md).
MIN_ROWS = 64


def length_buckets(
    attention_mask: Tensor, max_buckets: int = MAX_BUCKETS, min_rows: int | None = None
) -> list:
    """[(row indices [Bk], length Lk)] of equal-count groups of rows sorted by length (mask [B, L]);
    at least `min_rows` (default `MIN_ROWS`) rows a group, one group of all rows below twice that."""
    lengths = attention_mask.sum(dim=1)
    min_rows = MIN_ROWS if min_rows is None else min_rows
    count = max(1, min(max_buckets, attention_mask.shape[0] // min_rows))
    if count == 1:
        return [(None, attention_mask.shape[1])]
    order = lengths.argsort(stable=True)
    return [(rows, int(lengths[rows].max())) for rows in order.tensor_split(count)]


def trim(t: Tensor, length: int) -> Tensor:
    """t [B, L, ...] cut to its first `length` positions (t itself when nothing is cut)."""
    return t if t.shape[1] == length else t[:, :length]


def by_length(
    run: Callable[[Any, int], Tensor], attention_mask: Tensor, full_length: bool, inputs: Any
) -> Tensor:
    """`run(parts, length)` -> [Bk, Lk or Q, ...] for each group, put back in row order: [B, L, ...]
    (zero-padded past each group's length) when `full_length`, else [B, Q, ...].

    `inputs`: the row-aligned tensors [B, ...] that `run` reads, as a tensor or a (named) tuple of them
    (None allowed); `parts` is the same structure holding one group's rows, untrimmed (`run` cuts what
    has a length axis with `trim`). With one group `parts` is `inputs` itself and `length` is L.
    """
    buckets = length_buckets(attention_mask)
    if len(buckets) == 1:
        return run(inputs, attention_mask.shape[1])
    order = torch.cat([rows for rows, _ in buckets])
    counts = [len(rows) for rows, _ in buckets]
    leaves, spec = tree_flatten(inputs)
    groups = [
        leaf.index_select(0, order).split(counts) if isinstance(leaf, Tensor) else [leaf] * len(counts)
        for leaf in leaves
    ]
    width = attention_mask.shape[1]
    outputs = []
    for k, (_, length) in enumerate(buckets):
        out = run(tree_unflatten([group[k] for group in groups], spec), length)
        if full_length:
            out = F.pad(out, (0, 0, 0, width - length))
        outputs.append(out)
    return torch.cat(outputs).index_select(0, order.argsort())
