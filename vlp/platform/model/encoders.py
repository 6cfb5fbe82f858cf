"""Unimodal towers: a timm ViT for images and a transformers BERT for text, with local pretrained loading.

Weights are never downloaded here: `pretrained` is a local file (vision) or a local directory (text), so
the same config runs offline on a laptop and on a cluster that pre-stages its checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import timm
import torch
import torch.nn.functional as F
from timm.layers import PatchDropout, build_sincos2d_pos_embed
from timm.models import load_state_dict as timm_load_state_dict
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn
from transformers import AutoModel, BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertLayer, BertSelfAttention

from vlp.platform.model.packing import Packing, packing_for


@dataclass
class VisionConfig:
    """Size of the ViT image tower; `pretrained` is a local timm/ViT state-dict file (.safetensors or .pth).

    `pool` picks the image embedding for ITC: the [CLS] token ("cls", CLIP) or the size-weighted mean of
    the patch tokens ("mean"), which trains every patch token directly: from scratch, fusion then sees
    informative patch tokens much earlier.

    `pos_init` picks the start of the learned position embeddings: timm's truncated normal ("random", std
    0.02) or the fixed-frequency 2D sin-cos of MAE / MoCo v3 ("sincos", still trained). From scratch the
    random start is ~15x smaller than the patch embeddings, so where an object is stays nearly invisible
    for hundreds of steps; grounding and relation captions ("left of") need it from the first step.
    A `pretrained` file overrides either.

    `patch_dropout`: FLIP's patch dropout (Li et al. 2023; open_clip's `patch_dropout`): in training each
    image keeps a random share 1 - p of its patch tokens (timm's `PatchDropout`, after the position
    embeddings; [CLS] always kept; drawn from the global torch RNG, so seeded and resumed with it), so
    every block costs about that share; off in evaluation. 0 leaves the tower untouched.

    `model` names any timm ViT architecture (`vit_base_patch16_224`, `vit_small_patch16_384`, ...), built
    at `image_size` without a download; its own width, depth, heads and patch size then replace the
    explicit sizes below.
    """

    model: str | None = None
    image_size: int = 64
    patch_size: int = 8
    width: int = 192
    depth: int = 4
    heads: int = 3
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    pool: Literal["cls", "mean"] = "cls"
    pos_init: Literal["random", "sincos"] = "random"
    pretrained: str | None = None
    patch_dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"vision.patch_dropout must lie in [0, 1), got {self.patch_dropout}")


@dataclass
class TextConfig:
    """Size of the BERT text tower; `pretrained` is a local directory readable by `AutoModel.from_pretrained`.

    `pool` picks the text embedding for ITC: [CLS] ("cls") or the mean over real tokens ("mean"). From
    scratch, BERT's [CLS] output barely depends on the words (cosine ~0.99999 between captions at init),
    which stalls contrastive learning for hundreds of steps; the mean does not.

    `token_types: false` drops BERT's token-type embedding as ALBEF's and BLIP's BERT do (transformers'
    BERT always adds row 0 of its table to every token): the table is zeroed and frozen, so a pretrained
    BERT starts, and a converted ALBEF checkpoint continues, with their exact numbers.
    """

    width: int = 192
    depth: int = 2
    heads: int = 3
    max_len: int = 64
    mlp_ratio: float = 4.0  # BERT's intermediate_size / width
    dropout: float = 0.0
    pool: Literal["cls", "mean"] = "cls"
    pretrained: str | None = None
    token_types: bool = True


class VisionEncoder(nn.Module):
    """timm `VisionTransformer` returning every token: [B, 3, H, W] -> [B, 1 + N, D] ([CLS] first)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.vit = build_vit(config)
        if config.pos_init == "sincos":
            self.init_sincos_positions()
        if config.pretrained:
            self.load_pretrained(config.pretrained)
        if config.patch_dropout > 0:
            self.vit.patch_drop = PatchDropout(
                config.patch_dropout, num_prefix_tokens=self.vit.num_prefix_tokens
            )

    @property
    def width(self) -> int:
        return self.vit.embed_dim

    @property
    def num_tokens(self) -> int:
        """Tokens entering the blocks without patch dropout: the prefix ([CLS]) and every patch."""
        return self.vit.patch_embed.num_patches + self.vit.num_prefix_tokens

    def set_patch_dropout(self, share: float) -> None:
        """Switch patch dropout to `share` (0 = off: the tower without it); no parameters change."""
        self.config = replace(self.config, patch_dropout=share)  # validates
        vit = self.vit
        vit.patch_drop = PatchDropout(share, vit.num_prefix_tokens) if share > 0 else nn.Identity()

    @property
    def drops_patches(self) -> bool:
        """Whether a forward now keeps only part of the patch tokens (patch dropout, in training)."""
        return self.config.patch_dropout > 0 and self.training

    @torch.no_grad()
    def init_sincos_positions(self) -> None:
        """2D sin-cos position embeddings on the patch grid (timm's MAE builder), zero for the [CLS] token."""
        if self.width % 4:
            raise ValueError(f"vision.pos_init=sincos needs vision.width divisible by 4, got {self.width}")
        grid = list(self.vit.patch_embed.grid_size)
        table = build_sincos2d_pos_embed(grid, self.width).to(self.vit.pos_embed.dtype)
        self.vit.pos_embed.zero_()
        self.vit.pos_embed[0, self.vit.num_prefix_tokens :] = table

    def load_pretrained(self, path: str) -> None:
        """Load a local timm ViT checkpoint (.safetensors / .pth / .bin), resampling the position embeddings
        when the image size differs; keys or shapes that do not fit are a ValueError listing them."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"vision.pretrained: no such file: {path}")
        state = checkpoint_filter_fn(timm_load_state_dict(path, weights_only=True), self.vit)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        expected = self.vit.state_dict()
        shapes = [
            f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
            for k, v in state.items()
            if k in expected and v.shape != expected[k].shape
        ]
        missing = sorted(k for k in expected if k not in state and not k.startswith("head."))
        unexpected = sorted(k for k in state if k not in expected)
        if missing or unexpected or shapes:
            raise ValueError(
                f"vision.pretrained {path} does not fit the configured ViT: missing keys {missing}, "
                f"unexpected keys {unexpected}, shape mismatches {shapes}"
            )
        self.vit.load_state_dict(state, strict=False)

    def forward(self, images: Tensor, all_patches: bool = False) -> Tensor:
        """[B, 3, H, W] -> [B, 1 + N, D]; N the kept share of the patches under patch dropout unless
        `all_patches`."""
        if all_patches and self.drops_patches:
            with _without_patch_dropout(self.vit):
                return self.vit.forward_features(images)
        return self.vit.forward_features(images)


@contextmanager
def _without_patch_dropout(vit: VisionTransformer) -> Iterator[None]:
    dropout, vit.patch_drop = vit.patch_drop, nn.Identity()
    try:
        yield
    finally:
        vit.patch_drop = dropout


def build_vit(config: VisionConfig) -> VisionTransformer:
    """The ViT of `config`: a named timm architecture (no download) or one of the explicit sizes."""
    if config.model is not None:
        if not timm.is_model(config.model):
            raise ValueError(f"vision.model: unknown timm architecture {config.model!r}")
        try:
            vit = timm.create_model(
                config.model,
                pretrained=False,
                num_classes=0,
                img_size=config.image_size,
                drop_path_rate=config.drop_path,
            )
        except TypeError:  # a CNN or other family that has no img_size
            vit = None
        if not isinstance(vit, VisionTransformer):
            raise ValueError(
                f"vision.model {config.model!r} is not a timm VisionTransformer (vit_*, deit_*, ...)"
            )
        return vit
    if config.image_size % config.patch_size:
        raise ValueError(
            f"vision.image_size={config.image_size} must be a multiple of vision.patch_size={config.patch_size}"
        )
    return VisionTransformer(
        img_size=config.image_size,
        patch_size=config.patch_size,
        embed_dim=config.width,
        depth=config.depth,
        num_heads=config.heads,
        mlp_ratio=config.mlp_ratio,
        drop_path_rate=config.drop_path,
        num_classes=0,
        class_token=True,
    )


class TextEncoder(nn.Module):
    """transformers BERT (no pooler): ids [B, L] + mask [B, L] -> tokens [B, L, D] ([CLS] first)."""

    def __init__(
        self, config: TextConfig, vocab_size: int, pad_token_id: int, grow_vocabulary: bool = False
    ) -> None:
        """`grow_vocabulary`: a `pretrained` model with fewer token rows than `vocab_size` gains the missing
        rows (transformers' `resize_token_embeddings`, as BLIP adds [DEC] and [ENC] to BERT's); else an error."""
        super().__init__()
        self.config = config
        if config.pretrained:
            if not Path(config.pretrained).is_dir():
                raise FileNotFoundError(f"text.pretrained: no such directory: {config.pretrained}")
            self.bert, info = AutoModel.from_pretrained(
                config.pretrained,
                local_files_only=True,
                add_pooling_layer=False,
                attn_implementation="sdpa",
                output_loading_info=True,
            )
            unfit = {
                "missing keys": sorted(info.get("missing_keys") or ()),
                "unexpected keys": sorted(k for k in info.get("unexpected_keys") or () if "pooler" not in k),
                "shape mismatches": [str(m) for m in info.get("mismatched_keys") or ()],
            }
            if any(unfit.values()):
                raise ValueError(
                    f"text.pretrained {config.pretrained} does not fit a {type(self.bert).__name__}: "
                    + ", ".join(f"{kind} {keys}" for kind, keys in unfit.items())
                )
            self.bert.train()  # from_pretrained returns eval mode (dropout off); Lightning keeps module modes
            if self.bert.config.vocab_size < vocab_size and grow_vocabulary:
                self.bert.resize_token_embeddings(vocab_size)
            if self.bert.config.vocab_size < vocab_size:
                raise ValueError(
                    f"text.pretrained {config.pretrained} has vocab_size={self.bert.config.vocab_size}, "
                    f"smaller than the tokenizer's {vocab_size}"
                )
        else:
            bert_config = BertConfig(
                vocab_size=vocab_size,
                hidden_size=config.width,
                num_hidden_layers=config.depth,
                num_attention_heads=config.heads,
                intermediate_size=int(config.mlp_ratio * config.width),
                max_position_embeddings=config.max_len,
                hidden_dropout_prob=config.dropout,
                attention_probs_dropout_prob=config.dropout,
                pad_token_id=pad_token_id,
            )
            # Private API (transformers 5.23.0, tests/test_private_apis.py): a config built in code (not
            # from_pretrained) has no public argument that chooses the attention implementation
            bert_config._attn_implementation = "sdpa"
            self.bert = BertModel(bert_config, add_pooling_layer=False)
        if not config.token_types:
            token_types = self.bert.embeddings.token_type_embeddings
            with torch.no_grad():
                token_types.weight.zero_()
            token_types.weight.requires_grad_(False)
        self.packs = switch_to_packed_layers(self.bert)  # whether forward skips padding (`packing`)

    @property
    def width(self) -> int:
        return self.bert.config.hidden_size

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    @property
    def max_len(self) -> int:
        return self.bert.config.max_position_embeddings

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """ids [B, L] + mask [B, L] -> tokens [B, L, D]; the layers run on the packed real tokens when
        padding is worth skipping (`packing`; BERT encoders only), zeros then at the padded positions."""
        if input_ids.shape[1] > self.max_len:
            raise ValueError(f"text length {input_ids.shape[1]} exceeds text.max_len={self.max_len}")
        packing = packing_for(attention_mask) if self.packs else None
        if packing is None:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = packing.pack(self.bert.embeddings(input_ids=input_ids))
        keys = attention_mask.bool()[:, None, None, :]
        for layer in self.bert.encoder.layer:
            hidden = layer(hidden, keys, packing=packing)
        return packing.unpack(hidden)

    def embed(self, input_ids: Tensor, start: int = 0) -> Tensor:
        """Token + position embeddings only (for the caption decoder, which shares them as BLIP does);
        `start`: position of the first id (a generation step embeds one token at its position)."""
        return self.bert.embeddings(input_ids=input_ids, past_key_values_length=start)


def switch_to_packed_layers(bert: nn.Module) -> bool:
    """Make the layers of a bidirectional BERT encoder of plain `BertLayer`s with SDPA or eager attention
    `PackedBertLayer`s (same parameters, same state-dict keys; before any wrapper is applied) and return
    True; anything else (another architecture, a decoder, chunked feed-forward) stays as it is: False."""
    config = bert.config
    layers = getattr(getattr(bert, "encoder", None), "layer", ())
    plain = (
        isinstance(bert, BertModel)
        and not config.is_decoder
        and not config.add_cross_attention
        and not config.chunk_size_feed_forward
        and config._attn_implementation in ("sdpa", "eager")
        and all(type(layer) in (BertLayer, PackedBertLayer) for layer in layers)
        and all(type(layer.attention.self) is BertSelfAttention for layer in layers)
    )
    if plain:
        for layer in layers:
            # in-place class swap (transformers 5.23.0, tests/test_private_apis.py): PackedBertLayer reads
            # BertLayer's and BertSelfAttention's attributes; swapping keeps the modules, their parameters and
            # names, which a rebuilt layer would not
            layer.__class__ = PackedBertLayer
    return plain


class PackedBertLayer(BertLayer):
    """transformers' `BertLayer` that also runs on packed real tokens [T, D] (`packing`), padded only
    around attention: the same math (post-norm self-attention, then the feed-forward), the same modules
    and parameters, so wrappers applied to the layer (activation checkpointing, FSDP2, compile) apply."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *args, **kwargs) -> Tensor:
        """`packing` (keyword): hidden_states are its packed tokens [T, D] and attention_mask the bool key
        mask [B, 1, 1, L]; returns [T, D]. Without it, `BertLayer.forward`."""
        packing: Packing | None = kwargs.pop("packing", None)
        if packing is None:
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        attention = self.attention.self

        def heads(x: Tensor) -> Tensor:  # [T, D] -> [B, heads, L, D / heads]
            padded = packing.unpack(x).view(packing.batch, packing.length, -1, attention.attention_head_size)
            return padded.transpose(1, 2)

        q, k, v = (
            heads(project(hidden_states)) for project in (attention.query, attention.key, attention.value)
        )
        dropout = attention.dropout.p if self.training else 0.0
        context = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, dropout_p=dropout, scale=attention.scaling
        )
        context = packing.pack(context.transpose(1, 2).reshape(packing.batch, packing.length, -1))
        attended = self.attention.output(context, hidden_states)
        return self.output(self.intermediate(attended), attended)
