"""The real tokens of a right-padded batch packed into one row block, so per-token layers skip the padding.

A batch pads every caption to its longest (a quarter of the default's caption positions are padding), and
every per-token layer (projections, MLPs, norms, residuals) pays for those rows. Packing keeps the token
stream as [T, D], the T real tokens of all rows, and goes back to [B, L, ...] only where tokens meet each
other: inside attention, for the keys, values and queries (padded keys are masked there, so their values
never matter). Exact: every real token gets the same value and gradient as in the padded batch; what
padded positions hold differs (zeros) and nothing may read it.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Pack only when at least this share of the positions is padding: below it, the index copies around each
# attention cost more than the padded rows save in the projections and MLP
# (timings: benchmarks/results/2026-12-02-epyc-2cpu-make-train.md).
MIN_PADDING = 0.1


class Packing:
    """Where the real tokens of attention_mask [B, L] (1 = real) lie: `pack` [B, L, C] -> [T, C] and back."""

    def __init__(self, attention_mask: Tensor) -> None:
        self.batch, self.length = attention_mask.shape
        flat = attention_mask.reshape(-1).bool()
        self.index = flat.nonzero().squeeze(1)  # [T] positions b * L + l of the real tokens, in order
        self.tokens = int(self.index.numel())
        # packed row of each position, -1 at padding
        self.row = torch.full_like(flat, -1, dtype=torch.long)
        self.row[self.index] = torch.arange(self.tokens, device=flat.device)

    def pack(self, x: Tensor) -> Tensor:
        """x [B, L, C] -> its real tokens [T, C] (row-major: row 0's tokens first)."""
        return x.reshape(self.batch * self.length, -1).index_select(0, self.index)

    def unpack(self, x: Tensor) -> Tensor:
        """x [T, C] -> [B, L, C] with zeros at the padded positions."""
        padded = x.new_zeros(self.batch * self.length, x.shape[-1]).index_copy(0, self.index, x)
        return padded.view(self.batch, self.length, -1)

    def take(self, x: Tensor, positions: Tensor) -> Tensor:
        """The packed tokens x [T, C] at positions [B, Q] of each row -> [B, Q, C] (as `gather_tokens` on
        the padded batch; a padded position, which no caller reads, gives some real token instead)."""
        offsets = torch.arange(self.batch, device=positions.device)[:, None] * self.length
        rows = self.row[(positions + offsets).reshape(-1)].clamp(min=0)
        return x.index_select(0, rows).view(*positions.shape, x.shape[-1])


def packing_for(attention_mask: Tensor) -> Packing | None:
    """A `Packing` of attention_mask [B, L] when padding makes at least `MIN_PADDING` of it, else None."""
    padding = 1.0 - float(attention_mask.sum()) / max(attention_mask.numel(), 1)
    return Packing(attention_mask) if padding >= MIN_PADDING else None
