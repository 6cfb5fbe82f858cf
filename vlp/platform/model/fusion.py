"""Fusion layers: text tokens attend to each other, then to the image tokens (ALBEF / BLIP style).

Written here rather than taken from transformers because `BertConfig(add_cross_attention=True)` forces
`is_decoder=True` (causal self-attention) in transformers 5.x, while fusion needs bidirectional
self-attention and the caption decoder needs causal self-attention over the same cross-attention and
feed-forward weights. Residual blocks on `scaled_dot_product_attention`, in two styles (`FusionConfig.norm`):
pre-norm (`h + f(LN(h))`, a final LayerNorm after the stack; vlp's default, steadier from scratch) or
post-norm (`LN(h + dropout(f(h)))` after self-attention, cross-attention and feed-forward, no final norm:
BERT's layer, as ALBEF's fusion layers are, so its checkpoints load exactly).

A layer is called with one `LayerCall` value that says what the call asks for (masks, reused keys and
values, the rows to compute, packing); the methods the backbone's passes call besides `forward` are
declared on the layer (`FusionLayer.entry_points`), and a sharding plan reads them there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlp.platform.model.packing import Packing, packing_for
from vlp.platform.model.text_merging import merge_text_tokens, text_guided_merge
from vlp.platform.model.token_index import gather_tokens
from vlp.platform.model.token_merging import TokenMergingConfig, proportional_attention_bias


@dataclass
class FusionConfig:
    """Depth, heads and block style of the fusion stack; its width is the text tower's width.

    `norm`: "pre" (vlp's default: LayerNorm before each sub-block, a final LayerNorm) or "post" (BERT /
    ALBEF: LayerNorm after each residual sum, none at the end). `layer_norm_eps`: every fusion LayerNorm's
    and the MLM head's (BERT / ALBEF: 1e-12). `dropout`: on attention probabilities and the feed-forward's
    hidden units (pre), or where BERT has it (post: attention probabilities, after each output projection).
    `init_from_text_layers` [start, stop): ALBEF's initialisation, the fusion layers start as copies of
    layers start..stop-1 of the pretrained text model (`text.pretrained`, which then keeps layers
    0..start-1 as the text tower); their cross-attention starts new. Needs `norm: post`.
    """

    depth: int = 2
    heads: int = 3
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    norm: Literal["pre", "post"] = "pre"
    layer_norm_eps: float = 1e-5
    init_from_text_layers: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.norm not in ("pre", "post"):
            raise ValueError(f"fusion.norm must be 'pre' or 'post', got {self.norm!r}")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"fusion.layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        if self.init_from_text_layers is not None:
            start, stop = self.init_from_text_layers = tuple(self.init_from_text_layers)
            if not 0 <= start < stop or stop - start != self.depth:
                raise ValueError(
                    f"fusion.init_from_text_layers={list(self.init_from_text_layers)} must be [start, stop) "
                    f"with stop - start = fusion.depth={self.depth}"
                )
            if self.norm != "post":
                raise ValueError("fusion.init_from_text_layers copies BERT layers: it needs fusion.norm=post")


KeyValues = tuple[Tensor, Tensor]  # keys and values [B, heads, N, D / heads] of an attention's context


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

    def key_values(self, context: Tensor, packing: Packing | None = None, bias: bool = True) -> KeyValues:
        """The context's keys and values [B, heads, Nk, D / heads], computable once and reused by every
        query that reads the same context (image tokens across objectives, a decoder's past tokens).
        `packing`: the context is packed real tokens [T, Dk] (projected as such, padded back here);
        `bias=False`: the projection without its bias, a term to add to keys and values already computed
        (the bias is taken off as the projection of a zero token: through the module, so ZeRO-3 gathers it)."""
        projected = self.key_value(context)
        if not bias:
            projected = projected - self.key_value(context.new_zeros(context.shape[-1]))
        if packing is not None:
            projected = packing.unpack(projected)
        b = projected.shape[0]
        width = self.out.in_features
        k, v = projected.view(b, -1, 2, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        mask: Tensor | None = None,
        return_weights: bool = False,
        key_values: KeyValues | None = None,
        packing: Packing | None = None,
        context_packing: Packing | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """`mask`: bool (True = attend) or additive float, broadcastable to [B, heads, Nq, Nk].

        `key_values` replaces the projection of `context` when already computed. `return_weights` also
        returns the detached attention probabilities [B, heads, Nq, Nk] (computed explicitly instead of
        by SDPA, same FLOPs), e.g. to rank image tokens for merging. `packing`: x holds the packed real
        tokens [T, D] of that batch (projected as such, padded only around SDPA; the output comes back
        packed); `context_packing` likewise for `context`.
        """
        q = self.query(x)
        if packing is not None:
            q = packing.unpack(q)
        b, nq, d = q.shape
        q = q.view(b, nq, self.heads, d // self.heads).transpose(1, 2)
        if key_values is None:
            source = (x, packing) if context is None else (context, context_packing)
            key_values = self.key_values(*source)
        k, v = key_values
        dropout = self.dropout if self.training else 0.0
        if not return_weights:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
            out = out.transpose(1, 2).reshape(b, nq, d)
            return self.out(out if packing is None else packing.pack(out))
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else scores + mask
        weights = scores.softmax(dim=-1)
        out = (F.dropout(weights, dropout) @ v).transpose(1, 2).reshape(b, nq, d)
        return self.out(out if packing is None else packing.pack(out)), weights.detach()


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mlp_ratio: float, dropout: float) -> None:
        hidden = int(dim * mlp_ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))


@dataclass(frozen=True)
class LayerCall:
    """What one call of a fusion layer asks for.

    `self_mask`: bool (True = attend) or additive, broadcastable to [B, heads, L, L] (or [B, 1, 1, L]);
    `cross_mask`: additive key bias on the image tokens [B, 1, 1, N] or None; `self_norm`: replaces the
    self-attention's LayerNorm (BLIP's decoder has its own, beside its own self-attention); `self_attn`: replaces the
    layer's own self-attention (the caption decoder's causal one); `image_kv`: the precomputed
    cross-attention keys and values of the image (then `image` may be None); `queries` [B, Q]: only those
    positions' outputs are computed -> [B, Q, D] (ITM and grounding read [CLS], MLM its masked tokens);
    `self_attended`: the text is this layer's self-attention output already; `packing`: the text holds that
    batch's packed real tokens [T, D] (so does the output, unless `queries` picks rows).
    """

    self_mask: Tensor
    cross_mask: Tensor | None = None
    self_attn: MultiHeadAttention | None = None
    self_norm: nn.LayerNorm | None = None
    image_kv: KeyValues | None = None
    queries: Tensor | None = None
    self_attended: bool = False
    packing: Packing | None = None


class FusionLayer(nn.Module):
    """Self-attention over text, cross-attention text -> image, feed-forward; each residual, with the
    LayerNorm before (`norm="pre"`) or after the sum (`norm="post"`, BERT's layer)."""

    # the methods the backbone's passes call besides `forward`; a sharding plan gathers the layer around each
    entry_points = ("image_key_values", "key_value_terms", "self_attention", "decode_step", "text_only")
    # those token merging inside fusion calls instead of `forward` (the layer then stays gathered)
    merging_entry_points = ("attend", "feed_forward")

    def __init__(
        self,
        dim: int,
        image_dim: int,
        heads: int,
        mlp_ratio: float,
        dropout: float,
        norm: Literal["pre", "post"] = "pre",
        layer_norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.pre_norm = norm == "pre"
        # post-norm: BERT's dropout after each output projection, none inside the feed-forward
        self.output_dropout = 0.0 if self.pre_norm else dropout
        self.self_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.self_attn = MultiHeadAttention(dim, heads, dropout=dropout)
        self.cross_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.cross_attn = MultiHeadAttention(dim, heads, context_dim=image_dim, dropout=dropout)
        self.mlp_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        self.mlp = FeedForward(dim, mlp_ratio, dropout if self.pre_norm else 0.0)

    def block_input(self, norm: nn.LayerNorm, x: Tensor) -> Tensor:
        """What a sub-block reads of its residual stream x: LN(x) (pre-norm) or x (post-norm)."""
        return norm(x) if self.pre_norm else x

    def residual(self, norm: nn.LayerNorm, x: Tensor, out: Tensor) -> Tensor:
        """The residual stream after a sub-block's output `out`: x + out, or LN(x + dropout(out))."""
        if self.pre_norm:
            return x + out
        return norm(x + F.dropout(out, self.output_dropout, self.training))

    def forward(self, text: Tensor, image: Tensor | None, call: LayerCall) -> Tensor:
        """text [B, L, D] (packed [T, D] with `call.packing`) + image [B, N, Dv] -> [B, L, D] or [B, Q, D]."""
        return self.feed_forward(self.attend(text, image, call)[0])

    def attend(
        self, text: Tensor, image: Tensor | None, call: LayerCall, return_cross_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """The two attention sub-blocks without the feed-forward (`feed_forward`), so token merging can run
        between them (`FusionEncoder.merged_forward`).

        Returns (text as `forward` shapes it, text -> image attention [B, heads, L or Q, N] when
        `return_cross_weights`, else None).
        """
        queries, packing = call.queries, call.packing

        def take(x: Tensor) -> Tensor:
            return gather_tokens(x, queries) if packing is None else packing.take(x, queries)

        if call.self_attended:
            if queries is not None:
                text = take(text)
        else:
            attn = self.self_attn if call.self_attn is None else call.self_attn
            norm = self.self_norm if call.self_norm is None else call.self_norm
            source = self.block_input(norm, text)
            if queries is None:
                text = self.residual(norm, text, attn(source, mask=call.self_mask, packing=packing))
            else:
                self_mask = call.self_mask
                if self_mask.shape[-2] > 1:  # per-query (causal) mask: keep the queries' rows
                    self_mask = self_mask.gather(
                        2, queries[:, None, :, None].expand(-1, 1, -1, self_mask.shape[-1])
                    )
                out = attn(take(source), source, mask=self_mask, context_packing=packing)
                text = self.residual(norm, take(text), out)
        packing = packing if queries is None else None  # the picked rows [B, Q, D] are all read
        out = self.cross_attn(
            self.block_input(self.cross_norm, text),
            image,
            mask=call.cross_mask,
            key_values=call.image_kv,
            packing=packing,
            return_weights=return_cross_weights,
        )
        out, weights = out if return_cross_weights else (out, None)
        return self.residual(self.cross_norm, text, out), weights

    def feed_forward(self, text: Tensor) -> Tensor:
        """The feed-forward sub-block with its residual: [..., D] -> [..., D]."""
        return self.residual(self.mlp_norm, text, self.mlp(self.block_input(self.mlp_norm, text)))

    def decode_step(
        self,
        token: Tensor,
        past: KeyValues | None,
        self_attn: MultiHeadAttention,
        image_kv: KeyValues,
        cross_mask: Tensor | None = None,
        self_norm: nn.LayerNorm | None = None,
    ) -> tuple[Tensor, KeyValues]:
        """One generated token [B, 1, D] through the layer with causal self-attention `self_attn` (and
        `self_norm` in place of the layer's self-attention LayerNorm, when given) over the
        cached `past` keys and values [B, heads, T, D / heads] of the earlier tokens plus its own.

        Returns (the token's output [B, 1, D], past extended to T + 1). Equals row T of `forward` over the
        whole prefix with a causal mask, at the cost of one token.
        """
        norm = self.self_norm if self_norm is None else self_norm
        source = self.block_input(norm, token)
        k, v = self_attn.key_values(source)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        token = self.residual(norm, token, self_attn(source, key_values=(k, v)))
        out = self.cross_attn(
            self.block_input(self.cross_norm, token), None, mask=cross_mask, key_values=image_kv
        )
        return self.feed_forward(self.residual(self.cross_norm, token, out)), (k, v)

    def text_only(self, text: Tensor, self_mask: Tensor, packing: Packing | None = None) -> Tensor:
        """Self-attention and feed-forward, the cross-attention skipped (BLIP's unimodal text encoder runs its
        layers so): text [B, L, D] -> [B, L, D] (packed [T, D] with `packing`). Calls no other entry point (a
        sharding plan would release the layer's weights after that inner call)."""
        out = self.self_attn(self.block_input(self.self_norm, text), mask=self_mask, packing=packing)
        return self.feed_forward(self.residual(self.self_norm, text, out))

    def image_key_values(self, image: Tensor) -> KeyValues:
        """This layer's cross-attention keys and values of image tokens [B, N, Dv], to share between passes."""
        return self.cross_attn.key_values(image)

    def key_value_terms(self, added: Tensor) -> KeyValues:
        """The cross-attention keys and values of `added` [B or 1, N, Dv] without the bias: what adding it to
        image tokens adds to their keys and values (`FusionBackbone.patch_grid`)."""
        return self.cross_attn.key_values(added, bias=False)

    def self_attention(self, text: Tensor, self_mask: Tensor, packing: Packing | None = None) -> Tensor:
        """The self-attention sub-block alone: text [B, L, D] -> [B, L, D] (packed [T, D] with `packing`);
        it does not read the image."""
        out = self.self_attn(self.block_input(self.self_norm, text), mask=self_mask, packing=packing)
        return self.residual(self.self_norm, text, out)


# a BERT layer's parameters (transformers' / ALBEF's names) -> a post-norm fusion layer's, both without prefix
BERT_LAYER_NAMES = {
    "attention.self.query": "self_attn.query",
    "attention.output.dense": "self_attn.out",
    "attention.output.LayerNorm": "self_norm",
    "crossattention.self.query": "cross_attn.query",
    "crossattention.output.dense": "cross_attn.out",
    "crossattention.output.LayerNorm": "cross_norm",
    "intermediate.dense": "mlp.0",
    "output.dense": "mlp.3",
    "output.LayerNorm": "mlp_norm",
}
BERT_KEY_VALUE = {"attention.self": "self_attn.key_value", "crossattention.self": "cross_attn.key_value"}


def fusion_state_of_bert_layer(bert: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A BERT layer's state (`attention.self.query.weight`, ...; with `crossattention.*` when it has
    cross-attention, as ALBEF's fusion layers do) as a post-norm `FusionLayer`'s: the same math, with the
    separate key and value projections stacked into one `key_value` projection ([keys; values] rows).
    Names it lacks (cross-attention of a text-only layer) are left out, as are names of other kinds."""
    state = {}
    for name, new in BERT_LAYER_NAMES.items():
        for kind in ("weight", "bias"):
            if f"{name}.{kind}" in bert:
                state[f"{new}.{kind}"] = bert[f"{name}.{kind}"]
    for name, new in BERT_KEY_VALUE.items():
        for kind in ("weight", "bias"):
            if f"{name}.key.{kind}" in bert:
                state[f"{new}.{kind}"] = torch.cat([bert[f"{name}.key.{kind}"], bert[f"{name}.value.{kind}"]])
    return state


@torch.no_grad()
def init_from_bert_layers(fusion: FusionEncoder, bert_layers: Sequence[nn.Module]) -> None:
    """ALBEF's initialisation: each fusion layer starts as a copy of a pretrained BERT layer (self-attention,
    its LayerNorm, the feed-forward and its LayerNorm); cross-attention starts new with BERT's own init
    (weights N(0, 0.02), biases 0, LayerNorm 1 and 0), as ALBEF's `from_pretrained` gives it."""
    if len(bert_layers) != len(fusion.layers):
        raise ValueError(f"{len(bert_layers)} BERT layers for {len(fusion.layers)} fusion layers")
    for layer, bert in zip(fusion.layers, bert_layers, strict=True):
        state = fusion_state_of_bert_layer(bert.state_dict())
        own = layer.state_dict()
        unfit = [
            f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
            for k, v in state.items()
            if v.shape != own[k].shape
        ]
        if (
            unfit or len(state) != 14
        ):  # self-attention (query, key-value, out, norm) + feed-forward (2 + norm)
            raise ValueError(
                f"fusion layers do not fit the BERT layers they start from: shapes {unfit}, "
                f"copied {sorted(state)} of {type(bert).__name__}"
            )
        layer.load_state_dict(state, strict=False)
        for module in (layer.cross_attn.query, layer.cross_attn.key_value, layer.cross_attn.out):
            module.weight.normal_(0.0, 0.02)
            module.bias.zero_()
        layer.cross_norm.reset_parameters()


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
            FusionLayer(
                dim,
                image_dim,
                config.heads,
                config.mlp_ratio,
                config.dropout,
                config.norm,
                config.layer_norm_eps,
            )
            for _ in range(config.depth)
        )
        # pre-norm ends with a LayerNorm; post-norm's last layer ends normalised already (BERT, ALBEF)
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps) if config.norm == "pre" else nn.Identity()

    def image_key_values(self, image: Tensor) -> tuple[KeyValues, ...]:
        """Each layer's cross-attention keys and values of image tokens [B, N, Dv]: what fusion reads of an
        image, computed once per image and shared by every pass over it (ITM pairs, MLM, grounding, the
        caption decoder, each generation step)."""
        return tuple(layer.image_key_values(image) for layer in self.layers)

    def key_value_terms(self, added: Tensor) -> tuple[KeyValues, ...]:
        """Each layer's cross-attention keys and values of `added` [B or 1, N, Dv], bias left out: what adding
        it to image tokens adds to their keys and values."""
        return tuple(layer.key_value_terms(added) for layer in self.layers)

    def first_self_attention(
        self, text: Tensor, attention_mask: Tensor, text_sizes: Tensor | None = None
    ) -> Tensor:
        """The first layer's self-attention over text [B, L, D] (it reads no image), for captions fused with
        several images: pass its rows with `self_attended=True`. `text_sizes` [B, L]: merged captions'
        token sizes, attended in proportion (log-size key bias)."""
        packing = packing_for(attention_mask)
        if text_sizes is None:
            mask = self_attention_mask(attention_mask)
        else:
            mask = proportional_attention_bias(text_sizes, attention_mask.bool(), dtype=text.dtype)
        if packing is None:
            return self.layers[0].self_attention(text, mask)
        return packing.unpack(self.layers[0].self_attention(packing.pack(text), mask, packing))

    def forward(
        self,
        text: Tensor,
        attention_mask: Tensor,
        image: Tensor | None,
        image_bias: Tensor | None = None,
        causal: bool = False,
        self_attns: nn.ModuleList | None = None,
        image_kv: tuple[KeyValues, ...] | None = None,
        positions: Tensor | None = None,
        self_attended: bool = False,
        self_norms: nn.ModuleList | None = None,
    ) -> Tensor:
        """`image_bias` [B, N]: additive key bias on the image tokens (log token sizes after merging).

        `image_kv`: `image_key_values(image)` computed earlier (then `image` may be None). `self_attns` /
        `self_norms`: per layer, a self-attention / its LayerNorm replacing the layer's (a caption decoder's).
        `positions` [B, Q]: the last layer computes these queries alone -> [B, Q, D], exactly those rows of
        the full output (nothing after the last layer mixes tokens). `self_attended`: `text` is
        `first_self_attention(text)` already. A batch with enough padding runs packed (`packing`): the
        per-token work on its real tokens alone, zeros at the padded positions of the output.
        """
        packing = packing_for(attention_mask)
        call = LayerCall(
            self_mask=self_attention_mask(attention_mask, causal),
            cross_mask=None if image_bias is None else image_bias[:, None, None, :].to(text.dtype),
            packing=packing,
        )
        if packing is not None:  # per-token work on the real tokens alone (`packing`)
            text = packing.pack(text)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            layer_call = replace(
                call,
                self_attn=None if self_attns is None else self_attns[i],
                self_norm=None if self_norms is None else self_norms[i],
                image_kv=None if image_kv is None else image_kv[i],
                queries=positions if i == last else None,
                self_attended=self_attended and i == 0,
            )
            text = layer(text, image, layer_call)
        text = self.norm(text)
        return text if packing is None or positions is not None else packing.unpack(text)

    def merged_forward(
        self,
        text: Tensor,
        attention_mask: Tensor,
        image: Tensor | None,
        image_sizes: Tensor | None,
        merging: TokenMergingConfig,
        image_kv: tuple[KeyValues, ...] | None = None,
        positions: Tensor | None = None,
        self_attended: bool = False,
        text_sizes: Tensor | None = None,
    ) -> Tensor:
        """`forward` (bidirectional) with token merging before the first layer and between each layer's
        attention and its MLP.

        Image (PuMer): the `fusion_r` image tokens the real text attends least to in this layer's
        cross-attention (head mean; padded text rows masked out) merge into their most similar kept token,
        so later layers attend fewer. [CLS] stays.
        Text (ToMe, `merge_text_tokens`): `text_entry_r` caption tokens merge before the first layer and
        `text_r` after each layer's attention, by bipartite matching on their values, real-real pairs first
        and real tokens moved back in front, so a caption's result does not depend on its padding (captions
        must be right-padded); [CLS] never merges.
        Text merges are undone in reverse at the end (every original position takes its group's value), so
        the output keeps [B, L, D]. `text_sizes` [B, L]: `text` is a caption merged already (its entry merge
        done, e.g. by `merge_text_tokens` before a shared `first_self_attention`; positions then index it).
        Neither merges after the last layer's attention: nothing reads its image tokens, and its text rows
        are what objectives read one by one, so the last layer can compute the read rows alone.
        Merged tokens are attended in proportion to their size when `merging.proportional_attention`.
        image_sizes [B, N] (None = all 1), e.g. from a merging vision tower.

        The shortcuts of `forward` hold with merging on and give the same values and gradients:
        `image_kv` (the image's keys and values, computed once per image: used by every layer while the
        image tokens are unmerged, i.e. all layers when `fusion_r` is 0, else the first), `positions`
        [B, Q] (the last layer computes these queries alone -> [B, Q, D]), `self_attended` (`text` went
        through `first_self_attention`), and packing (per-token work on the real tokens alone, merged
        captions repacked after each merge).
        """
        proportional = merging.proportional_attention
        mask = attention_mask
        image_size = None if image_sizes is None else image_sizes[..., None].float()
        text_size = None if text_sizes is None else text_sizes[..., None].float()
        unmerges: list[Callable[[Tensor], Tensor]] = []
        where = None  # [B, L]: the index of each original position's token after the text merges so far
        if merging.text_entry_r > 0 and text_sizes is None:
            if self_attended:
                raise ValueError(
                    "merging.text_entry_r: merge the captions (merge_text_tokens) before their shared "
                    "first_self_attention and pass text_sizes"
                )
            merged = merge_text_tokens(text, merging.text_entry_r, mask)
            text, text_size, mask = merged.tokens, merged.size, merged.mask
            unmerges.append(merged.unmerge)
            where = _merged_index(merged.unmerge, text, where)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if text_size is None or not proportional:
                self_mask = self_attention_mask(mask)
            else:
                self_mask = proportional_attention_bias(text_size, mask.bool(), dtype=text.dtype)
            cross_mask = None
            if image_size is not None and proportional:
                cross_mask = proportional_attention_bias(image_size, dtype=text.dtype)
            queries = None
            if i == last and positions is not None:
                queries = positions if where is None else where.gather(1, positions)
            packing = packing_for(mask)
            call = LayerCall(
                self_mask=self_mask,
                cross_mask=cross_mask,
                image_kv=image_kv[i] if image_kv is not None and (i == 0 or merging.fusion_r == 0) else None,
                queries=queries,
                self_attended=self_attended and i == 0,
                packing=packing,
            )
            rank_image = merging.fusion_r > 0 and i < last
            x = text if packing is None else packing.pack(text)
            x, weights = layer.attend(x, image, call, return_cross_weights=rank_image)
            if rank_image:
                if image is None:
                    raise ValueError(
                        "fusion merging (fusion_r > 0) needs the image tokens, not only their keys"
                    )
                image, image_size = text_guided_merge(
                    image, weights, merging.fusion_r, image_size, mask.bool(), protect_first=True
                )
            if merging.text_r > 0 and i < last:
                x = x if packing is None else packing.unpack(x)
                merged = merge_text_tokens(x, merging.text_r, mask, text_size)
                x, text_size, mask = merged.tokens, merged.size, merged.mask
                unmerges.append(merged.unmerge)
                where = _merged_index(merged.unmerge, x, where)
                packing = packing_for(mask)
                x = x if packing is None else packing.pack(x)
            x = layer.feed_forward(x)
            text = x if packing is None or queries is not None else packing.unpack(x)
        text = self.norm(text)
        if positions is not None:
            return text
        for unmerge in reversed(unmerges):
            text = unmerge(text)
        return text


def _merged_index(unmerge: Callable[[Tensor], Tensor], merged: Tensor, where: Tensor | None) -> Tensor:
    """Where each original position's token lies after one more text merge: [B, L] indices into merged
    [B, L', D], from `where` [B, L_prev] (None: the identity) and the merge's `unmerge`."""
    b, n, _ = merged.shape
    index = torch.arange(n, device=merged.device, dtype=torch.float64).expand(b, n)[..., None]
    new_of_previous = unmerge(index)[..., 0].long()  # [B, L_prev]
    return new_of_previous if where is None else new_of_previous.gather(1, where)
