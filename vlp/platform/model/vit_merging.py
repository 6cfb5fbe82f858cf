"""Token merging inside a timm ViT: its blocks merge as they run, in one of two ways.

ToMe's (Bolya et al. 2023): each block merges the tokens the last one left, between its attention and its MLP,
so the output holds the merged tokens only; before them, the tokens may merge once as they enter (on what the
patches show, `MergingBlock.entry_merge`). ToMe for Stable Diffusion's (Bolya & Hoffman 2023): each block merges
its input, computes attention and MLP on the merged tokens and unmerges their outputs into the residual stream,
so every patch keeps a token of its own to the end; the output is merged once more for the readers of few tokens.
`apply_token_merging` swaps the classes of a timm ViT's blocks in place (weights and state_dict keys unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention, maybe_add_mask
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor

from vlp.platform.model.token_merging import (
    bipartite_soft_matching,
    merge_groups,
    merge_schedule,
    merge_source,
    merge_wavg,
    proportional_attention_bias,
    repeated_bipartite_matching,
)

# each round of the entry matching merges at most this share of the mergeable tokens: a token merges only where
# its best link ranks among the round's strongest (one round of ToMe's matching, which takes up to half, merges
# every token of set A when r nears half, objects into background too)
ENTRY_ROUND_SHARE = 0.25


@dataclass
class TokenMergingState:
    """Per-model merging settings and the last forward's results (plain attribute, not in state_dict).

    entry_r: tokens merged as the image enters the first block (`TokenMergingConfig.vision_entry_r`);
    patch_tokens: [B, N_patches, C] the patch embedding's output of the running forward, which that merge reads.

    size: [B, N_final, 1] tokens held by each output token (None when nothing merged);
    source: [B, N_final, N_original] membership map when `trace_source`;
    groups: [B, N_original] the output token that holds each input token (long; None when nothing merged);
    inputs: [B, N_original, C] the tokens that entered the first block of the last merging forward;
    unmerge: the blocks merge, compute and unmerge (`TokenMergingConfig.vision_unmerge`), r counted from
    all tokens; tokens: [B, N_original, C] then every token at the last block's output (before the ViT's
    final norm), of which the output merges r[-1] when `merge_output` (else the output is all of them).
    block_tokens: per block of the last forward, the mean of the token counts its attention and its MLP ran
    on (a ToMe block: attention on the tokens that enter, MLP on those left after its merge; an unmerging
    block: both on its merged tokens), what the blocks' work scales with.
    """

    r: list[int]
    proportional_attention: bool = True
    entry_r: int = 0
    patch_tokens: Tensor | None = None
    trace_source: bool = False
    protect_first: bool = True
    unmerge: bool = False
    merge_output: bool = True
    size: Tensor | None = None
    source: Tensor | None = None
    groups: Tensor | None = None
    inputs: Tensor | None = None
    tokens: Tensor | None = None
    block_tokens: list[float] = field(default_factory=list)

    @property
    def tokens_kept(self) -> float:
        """Fraction of the input tokens left after the last forward (1.0 without merging)."""
        if self.size is None:
            return 1.0
        return self.size.shape[1] / float(self.size[0].sum())


class MergingAttention(Attention):
    """timm `Attention` that can add the proportional bias and return the keys' head mean as metric."""

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        size: Tensor | None = None,
        return_metric: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x [B, N, C], size [B, N, 1]; returns out [B, N, C] (and metric [B, N, head_dim])."""
        if size is None and not return_metric:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("token merging does not support attn_mask or is_causal in the vision tower")
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = None if size is None else proportional_attention_bias(size, dtype=q.dtype)
        if self.fused_attn:
            dropout_p = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)
        else:
            attn = maybe_add_mask((q * self.scale) @ k.transpose(-2, -1), bias)
            out = self.attn_drop(attn.softmax(dim=-1)) @ v
        out = self.norm(out.transpose(1, 2).reshape(b, n, self.attn_dim))
        if gate is not None:
            out = out * gate
        out = self.proj_drop(self.proj(out))
        return (out, k.mean(dim=1)) if return_metric else out


class MergingBlock(Block):
    """timm `Block` that merges `r` tokens between attention and MLP (after the residual add)."""

    _tome_state: TokenMergingState
    _tome_layer: int

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        state = self._tome_state
        if self._tome_layer == 0:
            state.size, state.source, state.groups, state.inputs, state.tokens = None, None, None, None, None
            state.block_tokens = []
        if not any(state.r) and not state.entry_r:
            state.block_tokens.append(float(x.shape[1]))
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if self._tome_layer == 0:
            state.inputs = x
            if state.entry_r:
                x = self.entry_merge(x)
        if state.unmerge:
            return self.unmerging_forward(x, attn_mask, is_causal)
        size = state.size if state.proportional_attention else None
        out, metric = self.attn(
            self.norm1(x), attn_mask=attn_mask, is_causal=is_causal, size=size, return_metric=True
        )
        x = x + self.drop_path1(self.ls1(out))
        entered = x.shape[1]
        r = state.r[self._tome_layer]
        if r > 0:
            merge, unmerge = bipartite_soft_matching(metric, r, protect_first=state.protect_first)
            if state.trace_source:
                state.source = merge_source(merge, state.source, x)
            x, state.size = merge_wavg(merge, x, state.size)
            state.groups = merge_groups(unmerge, state.groups, x.shape[1], x)
        state.block_tokens.append((entered + x.shape[1]) / 2)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def entry_merge(self, x: Tensor) -> Tensor:
        """The tokens x [B, N, C] that enter the first block, `entry_r` of them merged (size-weighted averages):
        [B, N - entry_r, C], sizes and the token -> patch map set as the blocks' merges set them.

        The matching reads what each patch shows, its patch embedding before the position embedding, so alike
        patches merge wherever they lie (a plain background into a few tokens) while an object's patches keep
        tokens apart from it; it runs in rounds of at most `ENTRY_ROUND_SHARE` of the tokens. Under patch dropout
        (the kept patches' embeddings are not at hand) it reads the tokens themselves, position included."""
        state = self._tome_state
        metric = x
        patches, state.patch_tokens = state.patch_tokens, None
        prefix = int(state.protect_first)  # [CLS] first, never merged
        if patches is not None and patches.shape[1] + prefix == x.shape[1]:
            metric = torch.cat([x[:, :prefix], patches], dim=1)
        merge, unmerge = repeated_bipartite_matching(
            metric, state.entry_r, state.protect_first, ENTRY_ROUND_SHARE
        )
        if state.trace_source:
            state.source = merge_source(merge, None, x)
        x, state.size = merge_wavg(merge, x)
        state.groups = merge_groups(unmerge, None, x.shape[1], x)
        return x

    def unmerging_forward(self, x: Tensor, attn_mask: Tensor | None, is_causal: bool) -> Tensor:
        """ToMe for Stable Diffusion's block (`TokenMergingConfig.vision_unmerge`): x [B, N, C] -> [B, N, C],
        or, after the last block, [B, N - r[-1], C] with `state.tokens` = all N (unless `state.merge_output` is
        False: then [B, N, C] there too, nothing merged at the output).

        The merge is planned on the residual stream x (ToMeSD's metric) and serves both sub-blocks: attention
        and MLP read the size-weighted averages of their normed inputs, attention in proportion to the sizes,
        and each output goes back to every token its merged token holds."""
        state, layer = self._tome_state, self._tome_layer
        r = state.r[layer]
        if r > 0:
            merge, unmerge = repeated_bipartite_matching(x, r, state.protect_first)
            merged, size = merge_wavg(merge, self.norm1(x))
            attn_size = size if state.proportional_attention else None
            out = self.attn(merged, attn_mask=attn_mask, is_causal=is_causal, size=attn_size)
            x = x + unmerge(self.drop_path1(self.ls1(out)))
            merged = merge(self.norm2(x), mode="sum") / size.to(x.dtype)  # the sizes of the same plan
            x = x + unmerge(self.drop_path2(self.ls2(self.mlp(merged))))
            state.block_tokens.append(float(merged.shape[1]))
        else:
            state.block_tokens.append(float(x.shape[1]))
            x = super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if layer < len(state.r) - 1 or state.r[-1] == 0 or not state.merge_output:
            return x
        state.tokens = x
        merge, unmerge = repeated_bipartite_matching(x, state.r[-1], state.protect_first)
        if state.trace_source:
            state.source = merge_source(merge, None, x)
        x, state.size = merge_wavg(merge, x)
        state.groups = merge_groups(unmerge, None, x.shape[1], x)
        return x


def _keep_patch_tokens(state: TokenMergingState, module: object, args: object, output: Tensor) -> None:
    """Forward hook of the ViT's patch embedding: its output [B, N, C] for the entry merge to read."""
    if state.entry_r:
        state.patch_tokens = output


def _num_tokens(vit: VisionTransformer, entry_r: int = 0) -> int:
    """Tokens entering the first block's attention: [CLS] and every patch, less the entry merge's
    (capped as its matching caps it: [CLS] and one patch token remain)."""
    patches = vit.patch_embed.num_patches
    return vit.num_prefix_tokens + patches - min(entry_r, max(patches - 1, 0))


def _check_entry(entry_r: int, unmerge: bool) -> None:
    if isinstance(entry_r, bool) or not isinstance(entry_r, int) or entry_r < 0:
        raise ValueError(f"entry_r must be a non-negative integer, got {entry_r!r}")
    if entry_r and unmerge:
        raise ValueError(
            "entry merging removes tokens before the first block, and blocks that unmerge keep a token for "
            "every patch: use one or the other"
        )


def apply_token_merging(
    vit: VisionTransformer,
    r: int | list[int],
    proportional_attention: bool = True,
    trace_source: bool = False,
    schedule: str = "constant",
    inflection: float = 0.0,
    unmerge: bool = False,
    entry_r: int = 0,
) -> None:
    """Turn a timm VisionTransformer into a merging one in place; weights and state_dict keys unchanged.

    Swaps each `Block`/`Attention` class for its merging subclass and attaches a shared
    `vit._tome_state` (`TokenMergingState`). r = 0 everywhere runs timm's own forward (bitwise equal).
    `entry_r` tokens merge as the image enters the first block (`MergingBlock.entry_merge`; ToMe's blocks
    only), and the schedule counts from the tokens left. Not for use with `vit.set_grad_checkpointing()`:
    recomputation would reread the merged sizes.
    """
    if not isinstance(vit, VisionTransformer):
        raise TypeError(f"vit must be a timm VisionTransformer, got {type(vit).__name__}")
    if vit.num_prefix_tokens > 1:
        raise ValueError(
            f"only one prefix token ([CLS]) is supported, got num_prefix_tokens={vit.num_prefix_tokens}"
        )
    for i, block in enumerate(vit.blocks):
        if type(block) not in (Block, MergingBlock) or type(block.attn) not in (Attention, MergingAttention):
            raise TypeError(
                f"block {i} is {type(block).__name__} with {type(block.attn).__name__}; "
                "token merging supports timm Block with Attention"
            )
    _check_entry(entry_r, unmerge)
    per_layer = merge_schedule(
        r, len(vit.blocks), _num_tokens(vit, entry_r), schedule, vit.num_prefix_tokens, inflection, unmerge
    )
    state = TokenMergingState(
        per_layer,
        proportional_attention,
        entry_r=entry_r,
        trace_source=trace_source,
        protect_first=vit.num_prefix_tokens == 1,
        unmerge=unmerge,
    )
    vit._tome_state = state
    if getattr(vit, "_tome_patch_hook", None) is not None:
        vit._tome_patch_hook.remove()
    vit._tome_patch_hook = vit.patch_embed.register_forward_hook(partial(_keep_patch_tokens, state))
    for i, block in enumerate(vit.blocks):
        # in-place class swap (timm 1.0.31, tests/test_private_apis.py): the subclasses read timm Block's and
        # Attention's attributes; timm has no hook between attention and MLP where merging could happen
        block.__class__ = MergingBlock
        block.attn.__class__ = MergingAttention
        block._tome_state = state
        block._tome_layer = i


def token_merging_state(vit: VisionTransformer) -> TokenMergingState | None:
    """The merging state of a ViT (sizes/source of its last forward), None if it does not merge."""
    return getattr(vit, "_tome_state", None)


def set_merge_r(
    vit: VisionTransformer,
    r: int | list[int],
    schedule: str = "constant",
    inflection: float = 0.0,
    unmerge: bool | None = None,
    entry_r: int | None = None,
) -> None:
    """Change how many tokens a merging ViT merges per layer (e.g. raising r during training), with
    `unmerge` whether its blocks unmerge and with `entry_r` how many merge as the image enters (None: as
    they do)."""
    state = token_merging_state(vit)
    if state is None:
        raise ValueError("vit has no token merging; call apply_token_merging first")
    unmerge = state.unmerge if unmerge is None else unmerge
    entry_r = state.entry_r if entry_r is None else entry_r
    _check_entry(entry_r, unmerge)
    state.unmerge, state.entry_r = unmerge, entry_r
    state.r = merge_schedule(
        r, len(vit.blocks), _num_tokens(vit, entry_r), schedule, int(state.protect_first), inflection, unmerge
    )
