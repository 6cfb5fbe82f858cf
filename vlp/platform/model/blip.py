"""BlipBackbone: BLIP's multimodal mixture of encoder-decoder behind `FusionBackbone`'s contract.

BLIP (Li et al. 2022) has one BERT whose layers all carry cross-attention. It runs three ways:
- unimodal text encoder (ITC): embeddings -> every layer's self-attention and feed-forward, cross-attention
  skipped; [CLS] (or the mean) projected -> `TextFeatures.embedding`;
- image-grounded text encoder (ITM): re-run from the word embeddings with [ENC] in place of [CLS] and
  cross-attention in every layer: the fusion layers here, whose input `TextFeatures.tokens` are therefore
  the embeddings of the caption with [ENC] (so `fuse`, `first_self_attention`, `with_fusion_keys` and every
  shortcut of the joint step are `FusionBackbone`'s, unchanged and exact);
- image-grounded text decoder (LM): [DEC] first, the layers' own causal self-attention and its LayerNorm,
  everything else shared (`blip_decoder.BlipDecoder`), LM head with BERT's transform.

So the text tower holds only BERT's embeddings (`text.depth: 0`; BLIP's BERT has no token types:
`text.token_types: false`) and the fusion layers are BLIP's 12 layers (`fusion.norm: post`,
`fusion.layer_norm_eps: 1e-12`); from a pretrained BERT, `text.pretrained` with `fusion.init_from_text_layers:
[0, depth]` copies all its layers into them with new cross-attention, as BLIP starts from bert-base-uncased.
The tokenizer gains [DEC] (as its BOS) and [ENC] when it lacks them, in BLIP's order (30,522 -> 30,524).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from vlp.platform.model.architecture import as_plain_data
from vlp.platform.model.backbone import FusionBackbone, TextFeatures
from vlp.platform.model.blip_decoder import BlipDecoder
from vlp.platform.model.encoders import TextConfig, VisionConfig
from vlp.platform.model.fusion import FusionConfig, self_attention_mask
from vlp.platform.model.length_buckets import by_length, trim
from vlp.platform.model.momentum import MomentumConfig, MomentumModel
from vlp.platform.model.packing import packing_for
from vlp.platform.model.token_merging import TokenMergingConfig

DECODER_TOKEN, ENCODER_TOKEN = "[DEC]", "[ENC]"
LAYOUT = "blip"  # the value of `architecture["layout"]` that rebuilds this class


def add_blip_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """Add BLIP's [DEC] (as BOS) and [ENC] to `tokenizer` where missing, in BLIP's order; their ids."""
    vocab = tokenizer.get_vocab()
    if DECODER_TOKEN not in vocab:
        tokenizer.add_special_tokens({"bos_token": DECODER_TOKEN})
    if ENCODER_TOKEN not in vocab:
        tokenizer.add_special_tokens({"additional_special_tokens": [ENCODER_TOKEN]})
    return tokenizer.convert_tokens_to_ids(DECODER_TOKEN), tokenizer.convert_tokens_to_ids(ENCODER_TOKEN)


class BlipBackbone(FusionBackbone):
    """`FusionBackbone` with BLIP's shared encoder-decoder layers (see the module doc); same settings."""

    grows_vocabulary = True

    def __init__(
        self,
        vision: VisionConfig | None = None,
        text: TextConfig | None = None,
        fusion: FusionConfig | None = None,
        embed_dim: int = 128,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        tokenizer: PreTrainedTokenizerBase | None = None,
        caption_decoder: bool = False,
        merging: TokenMergingConfig | None = None,
        momentum: MomentumConfig | None = None,
        temperature: Literal["log_scale", "clamped"] = "log_scale",
        temperature_range: tuple[float, float] = (0.001, 0.5),
        init_logit_bias: float | None = None,
    ) -> None:
        """The settings are `FusionBackbone`'s; `text.depth` must be 0 (BLIP's layers are the fusion
        layers) unless `text.pretrained` is split into them by `fusion.init_from_text_layers: [0, depth]`."""
        if tokenizer is None:
            raise ValueError("BlipBackbone needs a tokenizer (the CLI links it from data.tokenizer)")
        decoder_id, encoder_id = add_blip_tokens(tokenizer)
        text = text or TextConfig(depth=0)
        fusion = fusion or FusionConfig()
        if fusion.init_from_text_layers is not None and fusion.init_from_text_layers[0] != 0:
            raise ValueError(
                "BLIP's layers start as all of a pretrained BERT's: fusion.init_from_text_layers must start at 0"
            )
        super().__init__(
            vision, text, fusion, embed_dim, init_temperature, max_logit_scale, tokenizer,
            False, merging, None, temperature, temperature_range, init_logit_bias,
        )  # fmt: skip
        if len(self.text.bert.encoder.layer):
            raise ValueError(
                "BlipBackbone: BLIP's text layers are the fusion layers; set text.depth: 0 (or text.pretrained "
                "with fusion.init_from_text_layers: [0, fusion.depth])"
            )
        if merging is not None and merging.merges_fusion:
            raise ValueError("BlipBackbone: token merging inside fusion (fusion_r, text_r) is not supported")
        self.decoder_token_id, self.encoder_token_id = decoder_id, encoder_id
        self.architecture.update(caption_decoder=caption_decoder, layout=LAYOUT)
        self.architecture["momentum"] = as_plain_data(momentum)
        self.decoder = BlipDecoder(self.text, self.fusion, self.decoder_token_id) if caption_decoder else None
        if self.decoder is not None and self.fusion.config.init_from_text_layers is not None:
            self.decoder.copy_self_attention(self.fusion)  # BLIP's decoder starts from the same BERT
        if momentum is not None:  # last: the copy is taken of everything above
            self.momentum = MomentumModel(self, momentum, shared=(tokenizer,))

    def text_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """What the image-grounded encoder starts from: the embeddings [B, L, D] of the ids with [ENC] at
        position 0 (BLIP's ITM input)."""
        if input_ids.shape[1] > self.text.max_len:
            raise ValueError(f"text length {input_ids.shape[1]} exceeds text.max_len={self.text.max_len}")
        ids = input_ids.clone()
        ids[:, 0] = self.encoder_token_id
        return self.text.embed(ids)

    def unimodal_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """BLIP's unimodal text encoder: embeddings -> each layer's self-attention and feed-forward (no
        cross-attention) -> [B, L, D]; in groups of similar length, packed where padding is worth skipping
        (padded positions unspecified)."""
        fusion = self.fusion

        def run(parts: tuple[Tensor, Tensor], length: int) -> Tensor:
            ids, mask = trim(parts[0], length), trim(parts[1], length)
            hidden = self.text.embed(ids)
            packing = packing_for(mask)
            self_mask = self_attention_mask(mask)
            if packing is not None:
                hidden = packing.pack(hidden)
            for layer in fusion.layers:
                hidden = layer.text_only(hidden, self_mask, packing)
            hidden = fusion.norm(hidden)
            return hidden if packing is None else packing.unpack(hidden)

        if input_ids.shape[1] > self.text.max_len:
            raise ValueError(f"text length {input_ids.shape[1]} exceeds text.max_len={self.text.max_len}")
        return by_length(run, attention_mask, full_length=True, inputs=(input_ids, attention_mask))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        """ITC embedding [B, E] from the unimodal encoder; `tokens`: the image-grounded encoder's input."""
        unimodal = self.unimodal_tokens(input_ids, attention_mask)
        if self.text.config.pool == "cls":
            pooled = unimodal[:, 0]
        else:
            weights = attention_mask[..., None].to(unimodal.dtype)
            pooled = (unimodal * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        embedding = F.normalize(self.text_proj(pooled), dim=-1)
        return TextFeatures(self.text_tokens(input_ids, attention_mask), attention_mask, embedding)
