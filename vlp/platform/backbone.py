"""FusionBackbone: the one set of parameters that every objective shares.

vision tower (timm ViT) + text tower (transformers BERT) + fusion layers + projections to a shared
embedding space with a learnable CLIP temperature. Objectives call its passes and own only their heads.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from vlp.platform.encoders import TextConfig, TextEncoder, VisionConfig, VisionEncoder
from vlp.platform.fusion import FusionConfig, FusionEncoder


class ImageFeatures(NamedTuple):
    tokens: Tensor  # [B, 1 + N, Dv], [CLS] first
    embedding: Tensor  # [B, E], L2-normalised
    sizes: Tensor | None = None  # [B, 1 + N] original patches per token after merging; None = all 1

    def take(self, index: Tensor) -> ImageFeatures:
        """The features of images `index` [K] (repeats allowed), e.g. to pair images with negative texts."""
        return ImageFeatures(*(None if field is None else field[index] for field in self))


class TextFeatures(NamedTuple):
    tokens: Tensor  # [B, L, Dt], [CLS] first
    attention_mask: Tensor  # [B, L], 1 = real token
    embedding: Tensor  # [B, E], L2-normalised


class FusionBackbone(nn.Module):
    """Unimodal passes (ITC), the fused pass (ITM / MLM / grounding) and the projections.

    `tokenizer` fixes the vocabulary and the special ids; the CLI links it from the data module so the
    text tower and the data always agree.
    """

    def __init__(
        self,
        vision: VisionConfig | None = None,
        text: TextConfig | None = None,
        fusion: FusionConfig | None = None,
        embed_dim: int = 128,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> None:
        super().__init__()
        if tokenizer is None:
            raise ValueError("FusionBackbone needs a tokenizer (the CLI links it from data.tokenizer)")
        if tokenizer.pad_token_id is None or tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer must define pad and mask tokens")
        self.tokenizer = tokenizer
        self.vision = VisionEncoder(vision or VisionConfig())
        self.text = TextEncoder(text or TextConfig(), len(tokenizer), tokenizer.pad_token_id)
        self.fusion = FusionEncoder(fusion or FusionConfig(), self.text.width, self.vision.width)
        self.vision_proj = nn.Linear(self.vision.width, embed_dim)
        self.text_proj = nn.Linear(self.text.width, embed_dim)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_logit_scale = math.log(max_logit_scale)
        self.register_buffer(
            "special_token_ids", torch.tensor(sorted(set(tokenizer.all_special_ids))), persistent=False
        )

    @property
    def width(self) -> int:
        """Width of the text and fused tokens."""
        return self.text.width

    @property
    def vocab_size(self) -> int:
        return self.text.word_embeddings.num_embeddings

    def logit_scale(self) -> Tensor:
        """exp of the learnable log scale, clamped at `max_logit_scale` as CLIP does."""
        return self.log_logit_scale.clamp(max=self.max_log_logit_scale).exp()

    def encode_image(self, images: Tensor) -> ImageFeatures:
        tokens = self.vision(images)
        return ImageFeatures(tokens, F.normalize(self.vision_proj(tokens[:, 0]), dim=-1))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        tokens = self.text(input_ids, attention_mask)
        return TextFeatures(tokens, attention_mask, F.normalize(self.text_proj(tokens[:, 0]), dim=-1))

    def fuse(self, image: ImageFeatures, text_tokens: Tensor, attention_mask: Tensor) -> Tensor:
        """Text tokens [B, L, Dt] attend to the image tokens [B, N, Dv] -> fused tokens [B, L, Dt].

        Merged image tokens are attended in proportion to their size (log-size key bias).
        """
        bias = None if image.sizes is None else image.sizes.log()
        return self.fusion(text_tokens, attention_mask, image.tokens, image_bias=bias)

    def special_tokens_mask(self, input_ids: Tensor) -> Tensor:
        """[B, L] bool: True where the id is a special token ([CLS], [SEP], [PAD], [MASK], ...)."""
        return torch.isin(input_ids, self.special_token_ids)


class FeatureCache:
    """The unimodal passes of one batch, computed on first use, so objectives in a joint step share them."""

    def __init__(self, backbone: FusionBackbone, batch: dict) -> None:
        self.backbone = backbone
        self.batch = batch

    @cached_property
    def image(self) -> ImageFeatures:
        return self.backbone.encode_image(self.batch["image"])

    @cached_property
    def text(self) -> TextFeatures:
        return self.backbone.encode_text(self.batch["input_ids"], self.batch["attention_mask"])
