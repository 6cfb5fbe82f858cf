"""FusionBackbone: the one set of parameters that every objective shares.

vision tower (timm ViT) + text tower (transformers BERT) + fusion layers + projections to a shared
embedding space with a learnable CLIP temperature. Objectives call its passes and own only their heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import cached_property
from typing import Any, Literal, NamedTuple, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from vlp.platform.model.architecture import as_plain_data
from vlp.platform.model.decoder import CaptionDecoder, DecoderCache
from vlp.platform.model.encoders import TextConfig, TextEncoder, VisionConfig, VisionEncoder
from vlp.platform.model.fusion import (
    FusionConfig,
    FusionEncoder,
    KeyValues,
    init_from_bert_layers,
)
from vlp.platform.model.length_buckets import by_length, trim
from vlp.platform.model.momentum import MomentumConfig, MomentumModel
from vlp.platform.model.text_merging import MergedText, merge_text_tokens
from vlp.platform.model.token_index import gather_tokens
from vlp.platform.model.token_merging import TokenMergingConfig
from vlp.platform.model.vit_merging import apply_token_merging, set_merge_r, token_merging_state

T = TypeVar("T")


class PatchGrid(NamedTuple):
    """Where a merged image's tokens came from (`FusionBackbone.patch_grid` puts them back)."""

    # [B, 1 + N] long: per input position ([CLS], every patch) the merged token holding it (ToMe's source map)
    groups: Tensor
    # [B, 1 + N, Dv]: the tokens that entered the ViT's first block (patch embedding + position)
    inputs: Tensor
    # [B, 1 + N, Dv]: every token at the ViT's last block, before its final norm, when its blocks unmerge
    # (`merging.vision_unmerge`); None under ToMe's merging, which keeps no token per patch
    tokens: Tensor | None = None


class ImageFeatures(NamedTuple):
    tokens: Tensor  # [B, 1 + N, Dv], [CLS] first (None where only fusion's keys and values are kept)
    embedding: Tensor  # [B, E], L2-normalised
    sizes: Tensor | None = None  # [B, 1 + N] original patches per token after merging; None = all 1
    # per fusion layer the cross-attention keys and values of `tokens` ([B, heads, 1 + N, Dt / heads] each),
    # set by `FusionBackbone.with_fusion_keys`; None = computed by each fused pass
    fusion_kv: tuple[KeyValues, ...] | None = None
    # where the merged tokens came from on the input grid; None when the vision tower merged nothing
    grid: PatchGrid | None = None

    def take(self, index: Tensor) -> ImageFeatures:
        """The features of images `index` [K] (repeats allowed), e.g. to pair images with negative texts;
        precomputed keys and values are gathered too, not recomputed."""
        rows = _take_rows(index)
        kv = None if self.fusion_kv is None else tuple((rows(k), rows(v)) for k, v in self.fusion_kv)
        tokens, embedding, sizes = (rows(t) for t in self[:3])  # tokens None: fusion reads only kv
        grid = None if self.grid is None else PatchGrid(*(rows(t) for t in self.grid))
        return ImageFeatures(tokens, embedding, sizes, kv, grid)

    def rows(self, n: int) -> ImageFeatures:
        """The features of the first `n` images (views, keys and values included)."""
        kv = None if self.fusion_kv is None else tuple((k[:n], v[:n]) for k, v in self.fusion_kv)
        tokens, embedding, sizes = (None if t is None else t[:n] for t in self[:3])
        grid = None if self.grid is None else PatchGrid(*(None if t is None else t[:n] for t in self.grid))
        return ImageFeatures(tokens, embedding, sizes, kv, grid)

    def read_by_fusion(self, keep_tokens: bool = False) -> ImageFeatures:
        """What the fused and decoder passes read: sizes, keys and values, and the tokens only when no keys
        and values were precomputed or `keep_tokens` (fusion merging merges them; the embedding never), so a
        length-grouped pass gathers nothing else."""
        tokens = self.tokens if self.fusion_kv is None or keep_tokens else None
        return ImageFeatures(tokens, None, self.sizes, self.fusion_kv)


def _take_rows(index: Tensor) -> Callable[[Tensor | None], Tensor | None]:
    """t [B, ...] -> t[index] [K, ...] (None stays None) by `index_select`, whose backward (`index_add`) costs
    less on CPU than advanced indexing's (`index_put` with accumulation)."""
    return lambda t: None if t is None else t.index_select(0, index)


def _grid_heads(x: Tensor, groups: Tensor) -> Tensor:
    """Per-head keys or values x [B, heads, M, D] of merged tokens put back on the grid by groups [B, N]
    -> [B, heads, N, D] (`gather_tokens` over the heads' features side by side)."""
    b, heads, m, d = x.shape
    grid = gather_tokens(x.transpose(1, 2).reshape(b, m, heads * d), groups)
    return grid.view(b, -1, heads, d).transpose(1, 2)


class TextFeatures(NamedTuple):
    tokens: Tensor  # [B, L, Dt], [CLS] first
    attention_mask: Tensor  # [B, L], 1 = real token
    embedding: Tensor  # [B, E], L2-normalised

    def rows(self, n: int) -> TextFeatures:
        """The features of the first `n` captions (views)."""
        return TextFeatures(*(t[:n] for t in self))


def first_rows(batch: dict, n: int) -> dict:
    """The batch's first `n` rows: every tensor, list or tuple with one entry per row (leading size B) is cut;
    other entries (class names, 0-d tensors) are kept. Evaluation batches' several references per image
    (`reference_*`, R rows) are not per-row and are refused."""
    size = batch_size_of(batch)
    if n >= size:
        return batch
    if any(key.startswith("reference_") for key in batch):
        raise ValueError("first_rows: batches with reference captions (reference_*) cannot be cut by rows")
    return {
        key: value[:n] if isinstance(value, Tensor | list | tuple) and _rows(value) == size else value
        for key, value in batch.items()
    }


def _rows(value: Tensor | list | tuple) -> int | None:
    """The leading size of a tensor (None for a 0-d one), list or tuple."""
    return None if isinstance(value, Tensor) and value.dim() == 0 else len(value)


def batch_size_of(batch: dict) -> int:
    """B: the batch's rows (its images)."""
    return int(batch["image"].shape[0])


def first_token(batch_size: int, device: torch.device) -> Tensor:
    """`positions` [B, 1] that select the fused [CLS] alone (ITM, grounding)."""
    return torch.zeros(batch_size, 1, dtype=torch.long, device=device)


class FusionBackbone(nn.Module):
    """Unimodal passes (ITC), the fused pass (ITM / MLM / grounding) and the projections.

    `tokenizer` fixes the vocabulary and the special ids; the CLI links it from the data module so the
    text tower and the data always agree.
    """

    # whether a pretrained text tower gains rows for tokens the tokenizer adds (BLIP's [DEC], [ENC])
    grows_vocabulary = False

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
        """`momentum` keeps an EMA copy of this backbone (`self.momentum`) for distillation and queues.

        `temperature` parametrises the contrastive temperature T (logits = cos / T), starting at
        `init_temperature`: "log_scale" (CLIP, the default) learns log(1 / T) (`log_logit_scale`), 1 / T
        capped at `max_logit_scale`: steps are relative, so T moves alike at 0.07 and 0.01; "clamped"
        (ALBEF) learns T itself (`temp`), read clamped to `temperature_range` ([0.001, 0.5] in ALBEF). ALBEF
        clamps the stored value in place before each forward; here the read value is clamped and the
        gradient passes straight through to `temp`, which gives ALBEF's logits and gradients whenever the
        stored value is in range (always, for a checkpoint of ALBEF's).

        `init_logit_bias`: SigLIP's learnable bias b of the pair logits t <x, y> + b (`logit_bias`; SigLIP
        starts it at -10), held beside the temperature so whatever scores pairs (ITC's sigmoid loss, zero-shot,
        retrieval probabilities) reads the one trained value; None (CLIP, ALBEF): no bias."""
        super().__init__()
        if tokenizer is None:
            raise ValueError("FusionBackbone needs a tokenizer (the CLI links it from data.tokenizer)")
        if tokenizer.pad_token_id is None or tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer must define pad and mask tokens")
        self.tokenizer = tokenizer
        # the settings that rebuild this module from a checkpoint (vlp.platform.model.architecture)
        self.architecture = as_plain_data(
            {
                "vision": vision or VisionConfig(),
                "text": text or TextConfig(),
                "fusion": fusion or FusionConfig(),
                "embed_dim": embed_dim,
                "init_temperature": init_temperature,
                "max_logit_scale": max_logit_scale,
                "caption_decoder": caption_decoder,
                "merging": merging,
                "momentum": momentum,
                "temperature": temperature,
                "temperature_range": temperature_range,
                "init_logit_bias": init_logit_bias,
            }
        )
        self.vision = VisionEncoder(vision or VisionConfig())
        self.text = TextEncoder(
            text or TextConfig(), len(tokenizer), tokenizer.pad_token_id, self.grows_vocabulary
        )
        self.fusion = FusionEncoder(fusion or FusionConfig(), self.text.width, self.vision.width)
        if self.fusion.config.init_from_text_layers is not None:
            self.split_text_tower(*self.fusion.config.init_from_text_layers)
        self.vision_proj = nn.Linear(self.vision.width, embed_dim)
        self.text_proj = nn.Linear(self.text.width, embed_dim)
        if temperature not in ("log_scale", "clamped"):
            raise ValueError(f"temperature must be 'log_scale' or 'clamped', got {temperature!r}")
        low, high = self.temperature_range = tuple(temperature_range)
        if temperature == "clamped" and not 0 < low <= init_temperature <= high:
            raise ValueError(
                f"init_temperature={init_temperature} must lie in temperature_range={list(temperature_range)} "
                "(and the range above 0)"
            )
        self.temperature = temperature
        if temperature == "clamped":
            self.temp = nn.Parameter(torch.tensor(float(init_temperature)))
        else:
            self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_logit_scale = math.log(max_logit_scale)
        self.logit_bias = (
            None if init_logit_bias is None else nn.Parameter(torch.tensor(float(init_logit_bias)))
        )
        self.register_buffer(
            "special_token_ids", torch.tensor(sorted(set(tokenizer.all_special_ids))), persistent=False
        )
        # captioning: causal decoder sharing the text embeddings and the fusion cross-attention + MLP
        self.decoder = CaptionDecoder(self.text, self.fusion) if caption_decoder else None
        self.merging: TokenMergingConfig | None = None
        self._tokens_kept = self._token_blocks_kept = 1.0  # of the last vision pass (`tokens_kept`)
        self.momentum: MomentumModel | None = None
        if merging is not None:
            self.set_merging(merging)
        if momentum is not None:  # last: the copy is taken of everything above
            self.momentum = MomentumModel(self, momentum, shared=(tokenizer,))

    def split_text_tower(self, start: int, stop: int) -> None:
        """ALBEF's layout from one pretrained BERT: layers 0..start-1 stay the text tower, the fusion layers
        start as copies of layers start..stop-1 (new cross-attention), and the text tower drops the rest."""
        if not self.text.config.pretrained:
            raise ValueError("fusion.init_from_text_layers copies layers of text.pretrained: set it")
        bert = self.text.bert
        layers, config = bert.encoder.layer, bert.config
        if stop > len(layers):
            raise ValueError(
                f"fusion.init_from_text_layers stops at {stop}, text.pretrained has {len(layers)} layers"
            )
        if config.num_attention_heads != self.fusion.config.heads:
            raise ValueError(
                f"fusion.heads={self.fusion.config.heads} differs from text.pretrained's "
                f"{config.num_attention_heads} heads, whose layers the fusion layers start from"
            )
        init_from_bert_layers(self.fusion, list(layers[start:stop]))
        bert.encoder.layer = layers[:start]
        config.num_hidden_layers = start

    @property
    def width(self) -> int:
        """Width of the text and fused tokens."""
        return self.text.width

    @property
    def vocab_size(self) -> int:
        return self.text.word_embeddings.num_embeddings

    def logit_scale(self) -> Tensor:
        """1 / T: exp of the learnable log scale, clamped at `max_logit_scale` as CLIP does; or (`temperature:
        clamped`) 1 / `temp` with `temp` read clamped to `temperature_range`, gradient straight through."""
        if self.temperature == "clamped":
            low, high = self.temperature_range
            temp = self.temp + (self.temp.clamp(low, high) - self.temp).detach()
            return 1.0 / temp
        return self.log_logit_scale.clamp(max=self.max_log_logit_scale).exp()

    def set_merging(
        self, merging: TokenMergingConfig | None = None, **changes: Any
    ) -> TokenMergingConfig | None:
        """Switch token merging to `merging`, or change fields of the current setting (`vision_r=8`).

        Parameters are untouched (merged and unmerged share one checkpoint); returns the previous setting.
        """
        if merging is not None and changes:
            raise ValueError(f"pass either a merging config or field changes, got both ({sorted(changes)})")
        previous = self.merging
        config = merging if merging is not None else replace(previous or TokenMergingConfig(), **changes)
        if not isinstance(config, TokenMergingConfig):
            raise TypeError(f"merging must be a TokenMergingConfig, got {type(config).__name__}")
        vit = self.vision.vit
        state = token_merging_state(vit)
        if state is None:
            apply_token_merging(
                vit,
                config.vision_r,
                config.proportional_attention,
                config.trace_source,
                config.schedule,
                config.inflection,
                config.vision_unmerge,
                config.vision_entry_r,
            )
        else:
            set_merge_r(
                vit,
                config.vision_r,
                config.schedule,
                config.inflection,
                config.vision_unmerge,
                config.vision_entry_r,
            )
            state.proportional_attention = config.proportional_attention
            state.trace_source = config.trace_source
        token_merging_state(vit).merge_output = config.vision_merge_output
        self.merging = config
        if self.momentum is not None:  # the EMA copy reads the same merged inputs
            self.momentum.backbone.set_merging(config)
        return previous

    @contextmanager
    def merging_override(self, **changes: Any) -> Iterator[TokenMergingConfig]:
        """Run a block with some merging fields changed, e.g. `vision_r=0, fusion_r=0` for the full model."""
        previous = self.set_merging(**changes)
        try:
            yield self.merging
        finally:
            self.set_merging(previous or TokenMergingConfig())

    @property
    def tokens_kept(self) -> float:
        """Fraction of its input tokens ([CLS] + patches) the vision tower put out in its last forward that
        could drop patches (all-patch passes aside): what token merging and patch dropout leave, 1.0 without
        either."""
        return self._tokens_kept

    @property
    def token_blocks_kept(self) -> float:
        """Share of the vision tower's token-blocks (tokens times blocks, against every input token through
        every block) its last forward that could drop patches ran: what its blocks' work shrinks to. Equals
        `tokens_kept` under patch dropout alone; below it where ToMe merges block by block; below 1.0 for
        blocks that unmerge although their output is whole (`tokens_kept` 1.0)."""
        return self._token_blocks_kept

    def encode_image(self, images: Tensor, all_patches: bool = False) -> ImageFeatures:
        """Image tokens [B, 1 + N', Dv] (N' < N when merging, `sizes` [B, 1 + N'] then set, or under patch
        dropout in training unless `all_patches`) and embedding."""
        dropped = self.vision.drops_patches and not all_patches
        tokens = self.vision(images, all_patches=all_patches)
        state = token_merging_state(self.vision.vit)
        if not all_patches:
            self._tokens_kept = tokens.shape[1] / self.vision.num_tokens
            ran = [] if state is None else state.block_tokens  # without merging blocks: all ran on the kept
            self._token_blocks_kept = (
                sum(ran) / (len(ran) * self.vision.num_tokens) if ran else self._tokens_kept
            )
        sizes = None if state is None or state.size is None else state.size[..., 0]
        # the input grid is the patch grid only when every patch entered the tower
        grid = None if sizes is None or dropped else PatchGrid(state.groups, state.inputs, state.tokens)
        if self.vision.config.pool == "cls":
            pooled = tokens[:, 0]
        elif sizes is None:
            pooled = tokens[:, 1:].mean(dim=1)
        else:
            weights = sizes[:, 1:, None].to(tokens.dtype)
            pooled = (tokens[:, 1:] * weights).sum(dim=1) / weights.sum(dim=1)
        return ImageFeatures(tokens, F.normalize(self.vision_proj(pooled), dim=-1), sizes, None, grid)

    def patch_grid(
        self, image: ImageFeatures, detail: Literal["positions", "inputs", "tokens"] = "positions"
    ) -> ImageFeatures:
        """A merged image back on its input grid, for heads that read where things are (grounding's boxes).

        Each input position ([CLS], every patch) gets the merged token that holds it (`image.grid.groups`,
        ToMe's source map) plus, by `detail`, its own position embedding (the ViT's `pos_embed`) or the token
        that entered the ViT there (patch embedding + position, `image.grid.inputs`): [B, 1 + N, Dv], sizes
        all one. A merged token averages its patches' positions and their detail; the copies give each
        patch its place (and its own pixels) back. When `image` carries fusion keys and values, the grid's
        follow by linearity: the copies' are gathered, the added term's projected without the bias, for
        positions once per batch, for inputs once per image (1 + N tokens). `tokens`: when the ViT's blocks
        unmerge (`merging.vision_unmerge`), every patch's own output token (the ViT's final norm applied;
        the fusion projects its keys and values, 1 + N per image). An unmerged image comes back as it is."""
        if image.grid is None:
            return image
        if detail == "tokens":
            if image.grid.tokens is None:
                raise ValueError(
                    "patch_grid 'tokens' reads every patch's token, which only a vision tower whose blocks "
                    "unmerge keeps: set merging.vision_unmerge, or read 'positions' or 'inputs'"
                )
            return ImageFeatures(self.vision.vit.norm(image.grid.tokens), image.embedding)
        if detail not in ("positions", "inputs"):
            raise ValueError(f"patch_grid detail must be 'positions', 'inputs' or 'tokens', got {detail!r}")
        groups, tokens = image.grid.groups, image.tokens
        if detail == "inputs":
            added = image.grid.inputs
        else:
            # [1, 1 + N, Dv], the [CLS] position too; a view, not the parameter: a leaf module input breaks
            # FlopCounterMode's backward hooks under autograd.grad (the FLOPs monitor's replay)
            added = self.vision.vit.pos_embed.to(tokens.dtype).expand(1, -1, -1)
            if added.shape[1] != groups.shape[1]:
                raise ValueError(
                    f"patch_grid: the image has {groups.shape[1]} input tokens, vision.vit.pos_embed "
                    f"{added.shape[1]} (a ViT whose position embeddings do not cover its input)"
                )
        grid = gather_tokens(tokens, groups) + added
        kv = None
        if image.fusion_kv is not None:
            kv = tuple(
                (_grid_heads(k, groups) + added_k, _grid_heads(v, groups) + added_v)
                for (k, v), (added_k, added_v) in zip(
                    image.fusion_kv, self.fusion.key_value_terms(added), strict=True
                )
            )
        return ImageFeatures(grid, image.embedding, None, kv)

    def text_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The text tower's tokens [B, L, Dt], run in groups of similar length (padded positions unspecified)."""

        def run(parts: tuple[Tensor, Tensor], length: int) -> Tensor:
            ids, mask = parts
            return self.text(trim(ids, length), trim(mask, length))

        return by_length(run, attention_mask, full_length=True, inputs=(input_ids, attention_mask))

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        tokens = self.text_tokens(input_ids, attention_mask)
        if self.text.config.pool == "cls":
            pooled = tokens[:, 0]
        else:
            weights = attention_mask[..., None].to(tokens.dtype)
            pooled = (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        return TextFeatures(tokens, attention_mask, F.normalize(self.text_proj(pooled), dim=-1))

    def with_fusion_keys(self, image: ImageFeatures) -> ImageFeatures:
        """`image` with each fusion layer's cross-attention keys and values computed once, so every fused
        or decoder pass over these images reuses them (gradients flow through the one computation)."""
        if image.fusion_kv is not None:
            return image
        return image._replace(fusion_kv=self.fusion.image_key_values(image.tokens))

    def fuse(
        self,
        image: ImageFeatures,
        text_tokens: Tensor,
        attention_mask: Tensor,
        merge_text: bool = True,
        positions: Tensor | None = None,
        self_attended: bool = False,
        text_sizes: Tensor | None = None,
    ) -> Tensor:
        """Text tokens [B, L, Dt] attend to the image tokens [B, N, Dv] -> fused tokens [B, L, Dt] (padded
        positions unspecified: a large batch runs in groups of similar caption length, see `length_buckets`).

        `positions` [B, Q] returns those fused tokens alone [B, Q, Dt] (the last layer computes no other
        query): `first_token(B)` for heads on [CLS], the masked positions for MLM; `self_attended`:
        `text_tokens` went through `first_self_attention` already. Merged image tokens are attended in
        proportion to their size (log-size key bias) unless `merging.proportional_attention` is off;
        `merging.fusion_r` / `text_r` / `text_entry_r` merge inside the fusion (`FusionEncoder.merged_forward`,
        which keeps these shortcuts, the length groups and packing). Merged text tokens come back unmerged
        (each position gets its group's value): fine for pooled outputs and [CLS] (never merged), lossy per
        token, so callers that read single tokens (MLM) pass `merge_text=False`.
        `text_sizes` [B, L]: `text_tokens` is a caption merged already (`merge_caption`), tokens attended in
        proportion to their size; positions then index the merged caption.
        """
        merging = self.merging or TokenMergingConfig()
        if not merge_text:
            merging = replace(merging, text_r=0, text_entry_r=0)
        merges_fusion = merging.merges_fusion or text_sizes is not None
        proportional = merging.proportional_attention

        def run(parts: tuple, length: int) -> Tensor:
            part, text, mask, queries, sizes = parts
            if merges_fusion:
                return self.fusion.merged_forward(
                    trim(text, length),
                    trim(mask, length),
                    part.tokens,
                    part.sizes,
                    merging,
                    image_kv=part.fusion_kv,
                    positions=queries,
                    self_attended=self_attended,
                    text_sizes=None if sizes is None else trim(sizes, length),
                )
            bias = None if part.sizes is None or not proportional else part.sizes.log()
            return self.fusion(
                trim(text, length),
                trim(mask, length),
                part.tokens,
                image_bias=bias,
                image_kv=part.fusion_kv,
                positions=queries,
                self_attended=self_attended,
            )

        image = image.read_by_fusion(keep_tokens=merges_fusion and merging.fusion_r > 0)
        inputs = (image, text_tokens, attention_mask, positions, text_sizes)
        return by_length(run, attention_mask, full_length=positions is None, inputs=inputs)

    def merge_caption(self, text_tokens: Tensor, attention_mask: Tensor) -> MergedText | None:
        """The captions [B, L, Dt] merged as they enter the fusion (`merging.text_entry_r`), once, for
        captions fused with several images (ITM): pass the result's tokens, mask and sizes to
        `first_self_attention` and `fuse(text_sizes=...)`. None when the fusion merges no caption at entry."""
        merging = self.merging
        if merging is None or merging.text_entry_r == 0:
            return None
        return merge_text_tokens(text_tokens, merging.text_entry_r, attention_mask)

    def first_self_attention(
        self, text_tokens: Tensor, attention_mask: Tensor, text_sizes: Tensor | None = None
    ) -> Tensor:
        """The first fusion layer's self-attention of captions [B, L, Dt], to share between the several
        images a caption is fused with (ITM): it reads no image, and text merging inside the fusion runs
        after it (entry merging before it: `merge_caption`, whose sizes [B, L] go in `text_sizes`)."""
        if self.merging is not None and not self.merging.proportional_attention:
            text_sizes = None
        return self.fusion.first_self_attention(text_tokens, attention_mask, text_sizes)

    def decode(self, image: ImageFeatures, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Caption decoder pass: ids [B, L] attend causally to each other and to the image tokens -> hidden
        [B, L, D] (before the tied LM head `decoder.logits`). Needs `caption_decoder=True`."""
        if self.decoder is None:
            raise ValueError("this backbone has no caption decoder: build it with caption_decoder=True")

        def run(parts: tuple, length: int) -> Tensor:
            part, ids, mask = parts
            bias = None if part.sizes is None else part.sizes.log()
            return self.decoder(trim(ids, length), trim(mask, length), part.tokens, bias, part.fusion_kv)

        inputs = (image.read_by_fusion(), input_ids, attention_mask)
        return by_length(run, attention_mask, full_length=True, inputs=inputs)

    def start_decoding(self, image: ImageFeatures) -> DecoderCache:
        """A cached caption generation over `image` (one row per hypothesis): feed it tokens step by step
        (`greedy_search` / `beam_search` drive it). Needs `caption_decoder=True`."""
        if self.decoder is None:
            raise ValueError("this backbone has no caption decoder: build it with caption_decoder=True")
        bias = None if image.sizes is None else image.sizes.log()
        return self.decoder.start(image.tokens, bias, image.fusion_kv)

    def special_tokens_mask(self, input_ids: Tensor) -> Tensor:
        """[B, L] bool: True where the id is a special token ([CLS], [SEP], [PAD], [MASK], ...)."""
        return torch.isin(input_ids, self.special_token_ids)


class FeatureCache:
    """The unimodal passes of one batch, computed on first use, so objectives in a joint step share them.

    `share_global_rows`: a joint step with ITC and ITM, whose global-batch gathers become one
    (`vlp.tasks.global_rows`)."""

    def __init__(self, backbone: FusionBackbone, batch: dict, share_global_rows: bool = False) -> None:
        self.backbone = backbone
        self.batch = batch
        self.share_global_rows = share_global_rows
        self._shared: dict[str, Any] = {}
        self._whole: FeatureCache | None = None  # set by `first_rows`: the cache these rows are cut from

    def first_rows(self, n: int) -> FeatureCache:
        """The cache of the batch's first `n` rows (`first_rows` of the batch): its unimodal features are
        this cache's, computed once over all rows and sliced, so an objective that learns from part of
        a joint step's batch shares the passes of the others and costs only its own work on `n` rows."""
        if n >= batch_size_of(self.batch):
            return self
        part = FeatureCache(self.backbone, first_rows(self.batch, n))
        part._whole = self
        return part

    def shared(self, key: str, compute: Callable[[], T]) -> T:
        """`compute()` on the first call with `key`, its result on later ones: work that several objectives
        of one step read, such as one gather of the global batch."""
        if key not in self._shared:
            self._shared[key] = compute()
        return self._shared[key]

    @cached_property
    def image(self) -> ImageFeatures:
        if self._whole is not None:
            return self._whole.image.rows(batch_size_of(self.batch))
        return self.backbone.encode_image(self.batch["image"])

    @cached_property
    def fused_image(self) -> ImageFeatures:
        """`image` with the fusion layers' keys and values, shared by every fused pass of the batch."""
        if self._whole is not None:
            return self._whole.fused_image.rows(batch_size_of(self.batch))
        return self.backbone.with_fusion_keys(self.image)

    @cached_property
    def image_all_patches(self) -> ImageFeatures:
        """`image` from every patch token: a second vision pass while patch dropout drops some (training
        with `vision.patch_dropout`), else `image` itself. For objectives that opt out of patch dropout
        (grounding reads boxes anywhere in the image)."""
        if not self.backbone.vision.drops_patches:
            return self.image
        if self._whole is not None:
            return self._whole.image_all_patches.rows(batch_size_of(self.batch))
        return self.backbone.encode_image(self.batch["image"], all_patches=True)

    @cached_property
    def fused_image_all_patches(self) -> ImageFeatures:
        """`image_all_patches` with the fusion layers' keys and values (`fused_image` without patch dropout)."""
        if not self.backbone.vision.drops_patches:
            return self.fused_image
        if self._whole is not None:
            return self._whole.fused_image_all_patches.rows(batch_size_of(self.batch))
        return self.backbone.with_fusion_keys(self.image_all_patches)

    @cached_property
    def text(self) -> TextFeatures:
        if self._whole is not None:
            return self._whole.text.rows(batch_size_of(self.batch))
        return self.backbone.encode_text(self.batch["input_ids"], self.batch["attention_mask"])

    @cached_property
    def references(self) -> TextFeatures:
        """Every caption of the batch's images [R, Lr, Dt] (`reference_input_ids`, evaluation batches of
        sources with several captions per image); the batch's captions when it has none."""
        if "reference_input_ids" not in self.batch:
            return self.text
        return self.backbone.encode_text(
            self.batch["reference_input_ids"], self.batch["reference_attention_mask"]
        )

    @cached_property
    def momentum_image(self) -> ImageFeatures:
        """The momentum model's image features of the batch (no gradient); needs `momentum` set."""
        if self._whole is not None:
            return self._whole.momentum_image.rows(batch_size_of(self.batch))
        with torch.no_grad():
            return self.momentum_backbone.encode_image(self.batch["image"])

    @cached_property
    def momentum_text(self) -> TextFeatures:
        """The momentum model's caption features of the batch (no gradient)."""
        if self._whole is not None:
            return self._whole.momentum_text.rows(batch_size_of(self.batch))
        with torch.no_grad():
            return self.momentum_backbone.encode_text(self.batch["input_ids"], self.batch["attention_mask"])

    @property
    def momentum_backbone(self) -> FusionBackbone:
        if self.backbone.momentum is None:
            raise ValueError("no momentum model: build the backbone with momentum: {decay: 0.995}")
        return self.backbone.momentum.backbone
