"""BLIP's caption decoder: the encoder's layers run causally, with their own self-attention.

BLIP (Li et al. 2022) ties its image-grounded text decoder to its text encoder except for the decoder's
causal self-attention and that attention's output LayerNorm (LAVIS: `tie_encoder_decoder_weights(...,
skip_key="/attention")`): the embeddings, every layer's cross-attention, feed-forward and their LayerNorms
are the encoder's. Its LM head is BERT's: a transform (dense, GELU, LayerNorm) before the decoder tied to the
word embeddings, plus a bias. [DEC] takes the place of the first token ([CLS]).

`BlipDecoder` has the call signature of `CaptionDecoder` (`forward`, `start`, `logits`, `loss`), so the
backbone's `decode` / `start_decoding`, the caption objective and the search functions use it unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.platform.kernels import linear_cross_entropy
from vlp.platform.model.decoder import IGNORE_INDEX
from vlp.platform.model.encoders import TextEncoder
from vlp.platform.model.fusion import FusionEncoder, KeyValues, MultiHeadAttention


class BlipDecoder(nn.Module):
    """Causal decoder over image tokens sharing the encoder's layers: ids [B, L] + image [B, N, Dv] ->
    hidden [B, L, D]; `start_id` ([DEC]) replaces the id at position 0.

    `text` and `fusion` belong to the backbone; they are held outside this module's children so their
    parameters and state-dict keys exist once."""

    def __init__(self, text: TextEncoder, fusion: FusionEncoder, start_id: int) -> None:
        super().__init__()
        self._shared = (text, fusion)
        self.start_id = start_id
        config, width = fusion.config, text.width
        self.self_attns = nn.ModuleList(
            MultiHeadAttention(width, config.heads, dropout=config.dropout) for _ in range(config.depth)
        )
        self.self_norms = nn.ModuleList(
            nn.LayerNorm(width, eps=config.layer_norm_eps) for _ in range(config.depth)
        )
        # BERT's LM-head transform: dense, GELU, LayerNorm (before the tied decoder)
        self.transform = nn.Sequential(
            nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width, eps=config.layer_norm_eps)
        )
        self.bias = nn.Parameter(torch.zeros(text.word_embeddings.num_embeddings))

    @torch.no_grad()
    def copy_self_attention(self, fusion: FusionEncoder) -> None:
        """Start each layer's own self-attention and its LayerNorm as copies of the encoder layer's (BLIP
        loads one pretrained BERT into both; only these stay untied)."""
        for layer, attn, norm in zip(fusion.layers, self.self_attns, self.self_norms, strict=True):
            attn.load_state_dict(layer.self_attn.state_dict())
            norm.load_state_dict(layer.self_norm.state_dict())

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self._shared[0].word_embeddings

    def embed(self, input_ids: Tensor, start: int = 0) -> Tensor:
        """Token + position embeddings, [DEC] at position 0."""
        if start == 0:
            input_ids = input_ids.clone()
            input_ids[:, 0] = self.start_id
        return self._shared[0].embed(input_ids, start=start)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        image_tokens: Tensor | None,
        image_bias: Tensor | None = None,
        image_kv: tuple[KeyValues, ...] | None = None,
    ) -> Tensor:
        """`image_bias` [B, N]: additive key bias on the image tokens; `image_kv`: the layers' keys and
        values of `image_tokens`, when computed already (then `image_tokens` may be None)."""
        text, fusion = self._shared
        if input_ids.shape[1] > text.max_len:
            raise ValueError(f"decoder input length {input_ids.shape[1]} exceeds text.max_len={text.max_len}")
        hidden = self.embed(input_ids)
        return fusion(
            hidden,
            attention_mask,
            image_tokens,
            image_bias=image_bias,
            causal=True,
            self_attns=self.self_attns,
            self_norms=self.self_norms,
            image_kv=image_kv,
        )

    def start(
        self,
        image_tokens: Tensor,
        image_bias: Tensor | None = None,
        image_kv: tuple[KeyValues, ...] | None = None,
    ) -> BlipDecoderCache:
        """A cached generation over images [N, Ni, Dv] (one row per hypothesis): a `DecodeStep`."""
        fusion = self._shared[1]
        return BlipDecoderCache(self, image_kv or fusion.image_key_values(image_tokens), image_bias)

    def logits(self, hidden: Tensor) -> Tensor:
        """LM head: hidden [..., D] -> transform -> tied decoder -> logits [..., V]."""
        return F.linear(self.transform(hidden), self.word_embeddings.weight, self.bias)

    def loss(
        self, hidden: Tensor, targets: Tensor, label_smoothing: float = 0.0, chunk_size: int | None = None
    ) -> Tensor:
        """Mean next-token cross-entropy of hidden [B, L, D] against targets [B, L] (IGNORE_INDEX = skip),
        through the fused kernel (the [B * L, V] logits are never materialised)."""
        keep = targets != IGNORE_INDEX
        return linear_cross_entropy(
            self.transform(hidden[keep]),
            self.word_embeddings.weight,
            targets[keep],
            bias=self.bias,
            chunk_size=chunk_size,
            label_smoothing=label_smoothing,
        )


class BlipDecoderCache:
    """One batched generation: per layer the decoder's self-attention keys and values of the tokens so far
    and the image's cross-attention keys and values; calling it feeds the next tokens (a `DecodeStep`)."""

    def __init__(
        self, decoder: BlipDecoder, image_kv: tuple[KeyValues, ...], image_bias: Tensor | None
    ) -> None:
        self.decoder = decoder
        self.image_kv = image_kv
        self.cross_mask = None if image_bias is None else image_bias[:, None, None, :]
        self.past: list[KeyValues | None] = [None] * len(image_kv)
        self.length = 0

    def __call__(self, tokens: Tensor, origin: Tensor | None = None) -> Tensor:
        """tokens [N] at the next position, `origin` [N]: the row each continues (beams reorder) -> [N, V]."""
        text, fusion = self.decoder._shared
        if self.length >= text.max_len:
            raise ValueError(f"generation past text.max_len={text.max_len} positions")
        if origin is not None:
            self.past = [None if kv is None else (kv[0][origin], kv[1][origin]) for kv in self.past]
        hidden = self.decoder.embed(tokens[:, None], start=self.length)
        cross_mask = None if self.cross_mask is None else self.cross_mask.to(hidden.dtype)
        decoder = self.decoder
        for i, layer in enumerate(fusion.layers):
            hidden, self.past[i] = layer.decode_step(
                hidden,
                self.past[i],
                decoder.self_attns[i],
                self.image_kv[i],
                cross_mask,
                decoder.self_norms[i],
            )
        self.length += 1
        return self.decoder.logits(fusion.norm(hidden)[:, 0])
