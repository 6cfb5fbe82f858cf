"""Token merging on the text side of the fusion: captions merged by ToMe's matching with their padding kept
apart, and PuMer's text-guided merging of the image tokens the caption attends least (Cao et al. 2023).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp.platform.model.token_index import gather_tokens
from vlp.platform.model.token_merging import bipartite_soft_matching, keep_all, merge_mask, merge_wavg


def text_guided_merge(
    image_tokens: Tensor,
    cross_attn_weights: Tensor,
    r: int,
    size: Tensor | None = None,
    text_mask: Tensor | None = None,
    protect_first: bool = False,
) -> tuple[Tensor, Tensor]:
    """PuMer-style: merge the `r` image tokens least attended by the real text into their most similar
    remaining token (cosine, size-weighted). Kept tokens stay in their original order.

    image_tokens [B, Ni, D]; cross_attn_weights text->image [B, H, Nt, Ni] or [B, Nt, Ni];
    size [B, Ni, 1]; text_mask [B, Nt] (True/1 = real). Returns (tokens [B, Ni - r, D], size).
    """
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    b, n, _ = image_tokens.shape
    attn = cross_attn_weights.mean(dim=1) if cross_attn_weights.dim() == 4 else cross_attn_weights
    if attn.dim() != 3 or attn.shape[0] != b or attn.shape[2] != n:
        raise ValueError(
            f"cross_attn_weights must be [B, H, Nt, Ni] or [B, Nt, Ni] with B={b}, Ni={n}, "
            f"got {tuple(cross_attn_weights.shape)}"
        )
    if text_mask is None:
        text_mask = torch.ones(attn.shape[:2], dtype=torch.bool, device=attn.device)
    if text_mask.shape != attn.shape[:2]:
        raise ValueError(f"text_mask must have shape {tuple(attn.shape[:2])}, got {tuple(text_mask.shape)}")
    protected = int(protect_first)
    r = min(r, max(n - protected - 1, 0))
    if r == 0:
        return merge_wavg(keep_all, image_tokens, size)

    with torch.no_grad():
        weight = text_mask.to(attn.dtype)[..., None]
        received = (attn * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)  # [B, Ni]
        if protect_first:
            received[:, 0] = torch.inf
        order = received.argsort(dim=-1)[..., None]
        src_idx = order[:, :r]
        keep_idx = order[:, r:].sort(dim=1).values
        metric = F.normalize(image_tokens, dim=-1)
        d = metric.shape[-1]
        similarity = metric.gather(1, src_idx.expand(-1, -1, d)) @ metric.gather(
            1, keep_idx.expand(-1, -1, d)
        ).transpose(1, 2)  # [B, r, Ni - r]
        if protect_first:
            similarity[..., 0] = -torch.inf
        dst_idx = similarity.argmax(dim=-1)[..., None]

    def merge(x: Tensor, mode: str = "mean") -> Tensor:
        c = x.shape[-1]
        kept = x.gather(1, keep_idx.expand(-1, -1, c))
        moved = x.gather(1, src_idx.expand(-1, -1, c))
        return kept.scatter_reduce(1, dst_idx.expand(-1, -1, c), moved, reduce=mode)

    return merge_wavg(merge, image_tokens, size)


class MergedText(NamedTuple):
    """A caption batch after one text merge, real tokens first in each row (`merge_text_tokens`)."""

    tokens: Tensor  # [B, Nt - r, D]
    size: Tensor  # [B, Nt - r, 1] real tokens held by each token (padding ones by padding groups)
    mask: Tensor  # [B, Nt - r], text_mask's dtype: real tokens first, then padding
    unmerge: Callable[[Tensor], Tensor]  # [B, Nt - r, C] -> [B, Nt, C]: each position its group's row


def merge_text_tokens(
    text_tokens: Tensor,
    r: int,
    text_mask: Tensor,
    size: Tensor | None = None,
    metric: Tensor | None = None,
    protect_first: bool = True,
) -> MergedText:
    """Merge `r` tokens of a right-padded caption batch by bipartite matching, padding never mixed into text.

    Real-real links go before padding-padding ones and the real tokens are moved back in front after the
    merge (stable), so which tokens of a caption merge, and where they end up, does not depend on how much
    padding its row has: the merged batch is right-padded again, fit for packing and length groups.
    text_tokens [B, Nt, D], text_mask [B, Nt] (bool or 0/1), size [B, Nt, 1], metric [B, Nt, C] (defaults to
    the tokens). [CLS] (position 0) never merges with `protect_first` and stays first.
    """
    if text_mask.shape != text_tokens.shape[:2]:
        raise ValueError(
            f"text_mask must have shape {tuple(text_tokens.shape[:2])}, got {tuple(text_mask.shape)}"
        )
    real = text_mask.bool()
    merge, unmerge = bipartite_soft_matching(
        text_tokens if metric is None else metric, r, protect_first=protect_first, mask=real, real_first=True
    )
    tokens, size = merge_wavg(merge, text_tokens, size, mask=real)
    real = merge_mask(merge, real)
    order = torch.sort((~real).to(torch.uint8), dim=1, stable=True).indices  # [B, Nt - r]: real first
    inverse = order.argsort(dim=1)

    def unmerge_text(x: Tensor) -> Tensor:
        return unmerge(gather_tokens(x, inverse))

    return MergedText(
        gather_tokens(tokens, order),
        gather_tokens(size, order),
        real.gather(1, order).to(text_mask.dtype),
        unmerge_text,
    )
