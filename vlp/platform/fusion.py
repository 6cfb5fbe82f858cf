"""Fusion layers: text tokens attend to each other, then to the image tokens (ALBEF / BLIP style).

Written here rather than taken from transformers because `BertConfig(add_cross_attention=True)` forces
`is_decoder=True` (causal self-attention) in transformers 5.x, while fusion needs bidirectional
self-attention and the caption decoder needs causal self-attention over the same cross-attention and
feed-forward weights. Pre-norm residual blocks on `scaled_dot_product_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class FusionConfig:
    """Depth and heads of the fusion stack; its width is the text tower's width."""

    depth: int = 2
    heads: int = 3
    mlp_ratio: float = 4.0
    dropout: float = 0.0


class MultiHeadAttention(nn.Module):
    """SDPA attention of queries x [B, Nq, D] over a context [B, Nk, Dk] (x itself when context is None)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"fusion width {dim} is not divisible by fusion.heads={heads}")
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(context_dim or dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """`mask`: bool (True = attend) or additive float, broadcastable to [B, heads, Nq, Nk]."""
        context = x if context is None else context
        b, nq, d = x.shape
        q = self.query(x).view(b, nq, self.heads, d // self.heads).transpose(1, 2)
        k, v = self.key_value(context).view(b, -1, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        dropout = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.out(out.transpose(1, 2).reshape(b, nq, d))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mlp_ratio: float, dropout: float) -> None:
        hidden = int(dim * mlp_ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))


class FusionLayer(nn.Module):
    """Self-attention over text, cross-attention text -> image, feed-forward; each pre-norm and residual."""

    def __init__(self, dim: int, image_dim: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = MultiHeadAttention(dim, heads, dropout=dropout)
        self.cross_norm = nn.LayerNorm(dim)
        self.cross_attn = MultiHeadAttention(dim, heads, context_dim=image_dim, dropout=dropout)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_ratio, dropout)

    def forward(
        self,
        text: Tensor,
        image: Tensor,
        self_mask: Tensor,
        cross_mask: Tensor | None = None,
        self_attn: MultiHeadAttention | None = None,
    ) -> Tensor:
        """`self_attn` replaces this layer's own self-attention (the caption decoder's causal one)."""
        attn = self.self_attn if self_attn is None else self_attn
        text = text + attn(self.self_norm(text), mask=self_mask)
        text = text + self.cross_attn(self.cross_norm(text), image, mask=cross_mask)
        return text + self.mlp(self.mlp_norm(text))


def self_attention_mask(attention_mask: Tensor, causal: bool = False) -> Tensor:
    """[B, L] (1 = real token) -> bool [B, 1, L, L] or [B, 1, 1, L]: keys that each query may attend to."""
    keys = attention_mask.bool()[:, None, None, :]
    if not causal:
        return keys
    length = attention_mask.shape[1]
    lower = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    return keys & lower


class FusionEncoder(nn.Module):
    """A stack of fusion layers: text [B, L, D] + image [B, N, Dv] -> fused text tokens [B, L, D]."""

    def __init__(self, config: FusionConfig, dim: int, image_dim: int) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(
            FusionLayer(dim, image_dim, config.heads, config.mlp_ratio, config.dropout)
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(
        self,
        text: Tensor,
        attention_mask: Tensor,
        image: Tensor,
        image_bias: Tensor | None = None,
        causal: bool = False,
        self_attns: nn.ModuleList | None = None,
    ) -> Tensor:
        """`image_bias` [B, N]: additive key bias on the image tokens (log token sizes after merging)."""
        self_mask = self_attention_mask(attention_mask, causal)
        cross_mask = None if image_bias is None else image_bias[:, None, None, :].to(text.dtype)
        for i, layer in enumerate(self.layers):
            text = layer(text, image, self_mask, cross_mask, None if self_attns is None else self_attns[i])
        return self.norm(text)
