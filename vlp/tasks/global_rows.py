"""Every rank's rows that ITM scores against, gathered once a step, and ITC's columns riding along.

ITM mines its negatives from the global batch, so it needs every rank's image ids, caption ids and masks
(no gradient), and the features it fuses: each caption after the first fusion self-attention and each
image's fusion keys and values (or tokens), with gradients, plus the ITC embeddings that pick the
negatives. ITC scores its local rows against every rank's embeddings, with gradients. In a joint step of
both (`FeatureCache.share_global_rows`) the embeddings gather with gradients in ITM's feature collective and
ITC reads them from there: one collective and one backward all-reduce fewer a step, and on two CPU ranks
each collective is a point where a rank waits for the other (docs/design.md: what a step shares).
Identity gathers in one process.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from vlp.platform.distributed.collectives import all_gather_many, pad_to
from vlp.platform.model.backbone import FeatureCache, FusionBackbone, ImageFeatures, TextFeatures


class GlobalRows(NamedTuple):
    """The global batch of W ranks x B rows, in rank order."""

    image: ImageFeatures  # fusion keys and values and/or tokens, merged sizes; embedding [W * B, E]
    text_tokens: Tensor  # [W * B, Lf, Dt] captions after the first fusion self-attention (if self_attended)
    text_embedding: Tensor  # [W * B, E]
    self_attended: bool
    image_ids: Tensor  # [W * B]
    input_ids: Tensor  # [W * B, L], L the longest caption of the global batch
    attention_mask: Tensor  # [W * B, L]
    text_mask: Tensor  # [W * B, Lf] of text_tokens: attention_mask, or the merged one (merging.text_entry_r)
    text_sizes: Tensor | None  # [W * B, Lf] tokens each merged caption token holds; None = not merged


class FusionCaptions(NamedTuple):
    """Captions as every fused pass over them reads them: merged at the fusion's entry when the backbone
    does (`merging.text_entry_r`), through the first fusion self-attention (it reads no image)."""

    tokens: Tensor  # [B, Lf, Dt]
    mask: Tensor  # [B, Lf]
    sizes: Tensor | None  # [B, Lf]; None = not merged
    self_attended: bool  # tokens went through the first self-attention (a test's unshared step: not)


def fusion_captions(backbone: FusionBackbone, text: TextFeatures) -> FusionCaptions:
    """The captions' entry merge and first fusion self-attention, once per caption, for the several images
    each is fused with (ITM's pairs)."""
    merged = backbone.merge_caption(text.tokens, text.attention_mask)
    if merged is None:
        tokens, mask, sizes = text.tokens, text.attention_mask, None
    else:
        tokens, mask, sizes = merged.tokens, merged.mask, merged.size[..., 0]
    attended = backbone.first_self_attention(tokens, mask, sizes)
    return FusionCaptions(tokens if attended is None else attended, mask, sizes, attended is not None)


def global_rows(features: FeatureCache) -> GlobalRows:
    """The step's `GlobalRows`, gathered on first use and shared by every objective that asks. The
    embeddings carry gradients when ITC reads them (`features.share_global_rows`), else they go detached
    (ITM only picks negatives with them, and a zero gradient would still move AdamW's moments)."""
    return features.shared("global_rows", lambda: gather_global_rows(features))


def gather_global_rows(features: FeatureCache) -> GlobalRows:
    """Two collectives forward: the integers, padded to the text tower's length limit (a width every rank
    knows, so no collective agrees on one first) and cut to the global batch's longest caption; then the
    features (with gradients), captions cut to that length. One all-reduce backward."""
    backbone: FusionBackbone = features.backbone
    batch, image, text = features.batch, features.fused_image, features.text
    captions = fusion_captions(backbone, text)
    # merged captions (merging.text_entry_r) travel with their own mask, besides the caption ids' one
    merged_mask = [] if captions.sizes is None else [captions.mask.to(text.attention_mask.dtype)]
    masks = (batch["input_ids"], text.attention_mask, *merged_mask)
    limit = [pad_to(t, 1, backbone.text.max_len) for t in masks]
    image_ids, input_ids, attention_mask, *merged_mask = all_gather_many([batch["image_id"], *limit])
    longest = int(attention_mask.sum(dim=1).max())
    input_ids, attention_mask = input_ids[:, :longest], attention_mask[:, :longest]
    text_mask = merged_mask[0] if merged_mask else attention_mask
    fused_longest = int(text_mask.sum(dim=1).max()) if merged_mask else longest
    text_mask = text_mask[:, :fused_longest]
    kv = [t for layer in image.fusion_kv or () for t in layer]
    # the tokens travel where no keys and values were computed, or where fusion merging merges them; the
    # merged sizes always (the fused pass's proportional attention reads them beside the keys)
    merges_image = backbone.merging is not None and backbone.merging.fusion_r > 0
    image_tokens = [image.tokens] if not kv or merges_image else []
    sizes = [] if image.sizes is None else [image.sizes]
    tokens = pad_to(captions.tokens[:, :fused_longest], 1, fused_longest)
    text_sizes = (
        [] if captions.sizes is None else [pad_to(captions.sizes[:, :fused_longest], 1, fused_longest)]
    )
    embeddings = [image.embedding, text.embedding]
    if not features.share_global_rows:
        embeddings = [e.detach() for e in embeddings]
    gathered = all_gather_many([tokens, *text_sizes, *kv, *image_tokens, *sizes, *embeddings], with_grad=True)
    text_tokens, (image_emb, text_emb) = gathered[0], gathered[-2:]
    global_text_sizes = gathered[1] if text_sizes else None
    gathered = gathered[len(text_sizes) :]
    global_kv = gathered[1 : 1 + len(kv)]
    rest = gathered[1 + len(kv) : -2]
    global_image = ImageFeatures(
        rest[0] if image_tokens else None,
        image_emb,
        rest[-1] if sizes else None,
        tuple(zip(global_kv[::2], global_kv[1::2], strict=True)) or None,
    )
    return GlobalRows(
        global_image,
        text_tokens,
        text_emb,
        captions.self_attended,
        image_ids,
        input_ids,
        attention_mask,
        text_mask,
        global_text_sizes,
    )
