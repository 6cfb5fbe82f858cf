"""BLIP's caption decoder: the encoder's layers run causally, with their own self-attention.

BLIP (Li et al. 2022) ties its image-grounded text decoder to its text encoder except for the decoder's
causal self-attention and that attention's output LayerNorm (LAVIS: `tie_encoder_decoder_weights(...,
skip_key="/attention")`): the embeddings, every layer's cross-attention, feed-forward and their LayerNorms
are the encoder's. Its LM head is BERT's: a transform (dense, GELU, LayerNorm) before the decoder tied to the
word embeddings, plus a bias. [DEC] takes the place of the first token ([CLS]).

`BlipDecoder` is a `CaptionDecoder` (its `forward`, `start`, `logits`, `loss` and cache), so the backbone's
`decode` / `start_decoding`, the caption objective and the search functions use it unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vlp.platform.model.decoder import CaptionDecoder
from vlp.platform.model.encoders import TextEncoder
from vlp.platform.model.fusion import FusionEncoder


class BlipDecoder(CaptionDecoder):
    """Causal decoder over image tokens sharing the encoder's layers: ids [B, L] + image [B, N, Dv] ->
    hidden [B, L, D]; `start_id` ([DEC]) replaces the id at position 0; per layer its own self-attention and
    that attention's LayerNorm; the LM head reads the hidden states through BERT's transform."""

    def __init__(self, text: TextEncoder, fusion: FusionEncoder, start_id: int) -> None:
        super().__init__(text, fusion)
        self.start_id = start_id
        config, width = fusion.config, text.width
        self.self_norms = nn.ModuleList(
            nn.LayerNorm(width, eps=config.layer_norm_eps) for _ in range(config.depth)
        )
        # BERT's LM-head transform: dense, GELU, LayerNorm (before the tied decoder)
        self.transform = nn.Sequential(
            nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=config.layer_norm_eps)
        )

    @torch.no_grad()
    def copy_self_attention(self, fusion: FusionEncoder) -> None:
        """Start each layer's own self-attention and its LayerNorm as copies of the encoder layer's (BLIP
        loads one pretrained BERT into both; only these stay untied)."""
        for layer, attn, norm in zip(fusion.layers, self.self_attns, self.self_norms, strict=True):
            attn.load_state_dict(layer.self_attn.state_dict())
            norm.load_state_dict(layer.self_norm.state_dict())

    def embed(self, input_ids: Tensor, start: int = 0) -> Tensor:
        """Token + position embeddings, [DEC] at position 0."""
        if start == 0:
            input_ids = input_ids.clone()
            input_ids[:, 0] = self.start_id
        return super().embed(input_ids, start=start)

    def head_input(self, hidden: Tensor) -> Tensor:
        """BERT's LM-head transform of hidden [..., D]."""
        return self.transform(hidden)
