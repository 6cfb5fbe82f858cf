"""Token merging's matching, its per-layer schedule and its settings (ToMe's bipartite soft matching).

Merging averages similar tokens instead of dropping them, so a layer sees fewer tokens while every
original token still contributes. Each merged token carries a *size* (how many originals it holds); the
average is size-weighted and attention adds `log(size)` on the key axis (proportional attention) so a
merged token is attended as much as the tokens it replaced. Implemented from the paper's description:
Bolya et al. 2023 (ToMe). Where the matching is applied: `vit_merging` (the ViT's blocks) and
`text_merging` (captions, and PuMer's text-guided merging of image tokens in the fusion).

A merge is a pair of closures: `merge_fn(x [B, N, C], mode) -> [B, N - r, C]` reduces tokens with a
`torch.scatter_reduce` mode ("sum", "mean", "amax"), `unmerge_fn` maps merged tokens back to [B, N, C].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp.platform.model.token_index import gather_tokens, sum_tokens

MergeFn = Callable[..., Tensor]
SCHEDULES = ("constant", "decreasing")
# every field of `TokenMergingConfig` that merges, at 0: `backbone.merging_override(**MERGING_OFF)` runs the
# plain model whatever the setting
MERGING_OFF = {"vision_r": 0, "vision_entry_r": 0, "fusion_r": 0, "text_r": 0, "text_entry_r": 0}


def keep_all(x: Tensor, mode: str = "mean") -> Tensor:
    """The merge of r = 0: the input object itself."""
    return x


def bipartite_soft_matching(
    metric: Tensor, r: int, protect_first: bool = True, mask: Tensor | None = None, real_first: bool = False
) -> tuple[MergeFn, MergeFn]:
    """Plan the merge of the `r` most similar tokens of `metric` [B, N, C].

    Tokens alternate into sets A (even positions) and B (odd); every A token links to its most
    cosine-similar B token and the r strongest links merge A into B. r is capped at half the mergeable
    tokens. The first token ([CLS]) is never merged when `protect_first`, and the unmerged A tokens keep
    their original order; without it they come in order of their best link, strongest first, as ToMe's
    `bipartite_soft_matching` leaves them for a ViT without class token. `mask` [B, N] bool (True = real)
    forbids real-padding links, so padding merges among itself; should r force one anyway, `merge_wavg`
    with the same mask keeps the padding out of the real token's value. `real_first` ranks every
    real-real link above every padding-padding one, so which real tokens merge never depends on how much
    padding a row has or what it holds.
    """
    if r < 0:
        raise ValueError(f"r must be >= 0, got {r}")
    b, n, _ = metric.shape
    if mask is not None and mask.shape != (b, n):
        raise ValueError(f"mask must have shape {(b, n)}, got {tuple(mask.shape)}")
    protected = int(protect_first)
    r = min(r, (n - protected) // 2)
    if r <= 0:
        return keep_all, keep_all

    with torch.no_grad():
        metric = F.normalize(metric, dim=-1)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # [B, Na, Nb]
        if mask is not None:
            crosses = mask[:, ::2, None] != mask[:, None, 1::2]
            scores = scores.masked_fill(crosses, torch.finfo(scores.dtype).min)
            if real_first:
                padding_pairs = ~mask[:, ::2, None] & ~mask[:, None, 1::2]
                scores = torch.where(padding_pairs, scores - 4.0, scores)  # cosines lie in [-1, 1]
        if protect_first:
            scores[:, 0] = -torch.inf  # below any masked link, so never chosen
        best_score, best_dst = scores.max(dim=-1)  # [B, Na]
        ranked = best_score.argsort(dim=-1, descending=True)
        src_idx = ranked[:, :r]  # [B, r]
        keep_idx = ranked[:, r:]  # [B, Na - r]
        if protect_first:  # [CLS] back in front, the rest in original order (without one: score order)
            keep_idx = keep_idx.sort(dim=1).values
        dst_idx = best_dst.gather(1, src_idx)  # [B, r]
        # The merged sequence holds the kept A tokens, then the B tokens, each moved A token added to its B
        # token. `order` [B, N]: the tokens as the sums take them (kept A, every B, the moved A strongest link
        # first: ToMe's order); `slot` [B, N]: where each of those goes; `index` [B, N]: where each goes by
        # its place in the input (the unmerge's map).
        n_keep, n_b = keep_idx.shape[1], scores.shape[2]
        arange = torch.arange(n, device=metric.device).expand(b, -1)
        order = torch.cat([2 * keep_idx, 2 * arange[:, :n_b] + 1, 2 * src_idx], dim=1)
        slot = torch.cat([arange[:, : n - r], dst_idx + n_keep], dim=1)
        index = torch.empty_like(order).scatter_(1, order, slot)
    merged = n - r

    def merge(x: Tensor, mode: str = "mean") -> Tensor:
        ordered = gather_tokens(x, order)
        if mode == "sum":  # the size-weighted average's (`merge_wavg`): whole rows, summed in ToMe's order
            return sum_tokens(ordered, slot, merged)
        into = slot[:, merged:, None].expand(-1, -1, x.shape[-1])
        return ordered[:, :merged].scatter_reduce(1, into, ordered[:, merged:], reduce=mode)

    def unmerge(x: Tensor) -> Tensor:
        return gather_tokens(x, index)

    return merge, unmerge


def repeated_bipartite_matching(
    metric: Tensor, r: int, protect_first: bool = True, round_share: float = 0.5
) -> tuple[MergeFn, MergeFn]:
    """Plan the merge of `r` tokens of `metric` [B, N, C] that may exceed half of them: bipartite soft
    matching repeated on its own size-weighted result, each round merging at most `round_share` (at most half)
    of the mergeable tokens left (ToMe for Stable Diffusion merges up to 3/4 of a block's tokens at once; a
    smaller share merges only the strongest links of each round). r is capped so that
    `protect_first` + 1 tokens remain. Returns one merge and one unmerge, as `bipartite_soft_matching`, each a
    single scatter or gather over the rounds' groups (`grouped_merge`): a "mean" merge is each group's mean."""
    metric, size = metric.detach(), None  # a plan, as each matching's: no gradient through it
    groups = None
    while r > 0:
        mergeable = metric.shape[1] - int(protect_first)
        step = min(r, mergeable // 2, max(1, int(mergeable * round_share)))
        if step <= 0:
            break
        merge, unmerge = bipartite_soft_matching(metric, step, protect_first)
        metric, size = merge_wavg(merge, metric, size)
        groups = merge_groups(unmerge, groups, metric.shape[1], metric)
        r -= step
    if groups is None:
        return keep_all, keep_all
    return grouped_merge(groups, metric.shape[1])


def grouped_merge(groups: Tensor, merged: int) -> tuple[MergeFn, MergeFn]:
    """Merge and unmerge by a map `groups` [B, N] (long: each token's index among the `merged` tokens), in
    one scatter (merge: [B, N, C] -> [B, merged, C], by `torch.scatter_reduce` mode; "sum", the size-weighted
    average's, as one `index_add`) and one gather (unmerge: [B, merged, C] -> [B, N, C], each token its
    group's row)."""

    def merge(x: Tensor, mode: str = "mean") -> Tensor:
        if mode == "sum":
            return sum_tokens(x, groups, merged)
        index = groups[..., None].expand(-1, -1, x.shape[-1])
        out = x.new_zeros(x.shape[0], merged, x.shape[-1])
        return out.scatter_reduce(1, index, x, reduce=mode, include_self=False)

    def unmerge(x: Tensor) -> Tensor:
        return gather_tokens(x, groups)

    return merge, unmerge


def merge_wavg(
    merge_fn: MergeFn, x: Tensor, size: Tensor | None = None, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge of `x` [B, N, C]; returns (x [B, N - r, C], size [B, N - r, 1]).

    `size` [B, N, 1] defaults to float32 ones (exact counts under bf16); merged sizes add up, so they sum to the original token count.
    With `mask` [B, N] (True = real) a group holding any real token averages its real members only and
    its size counts them only: sum(size * merged mask) stays the number of real tokens.
    """
    if size is None:
        size = torch.ones_like(x[..., :1], dtype=torch.float32)
    if merge_fn is keep_all:
        return x, size
    if mask is None:
        merged_size = merge_fn(size, mode="sum")
        return merge_fn(x * size.to(x.dtype), mode="sum") / merged_size.to(x.dtype), merged_size
    real_weight = size * mask[..., None].to(size.dtype)
    pad_weight = size - real_weight
    real_size, pad_size = merge_fn(real_weight, mode="sum"), merge_fn(pad_weight, mode="sum")
    is_real = real_size > 0
    real_x = merge_fn(x * real_weight.to(x.dtype), mode="sum") / real_size.clamp_min(1e-6).to(x.dtype)
    pad_x = merge_fn(x * pad_weight.to(x.dtype), mode="sum") / pad_size.clamp_min(1e-6).to(x.dtype)
    return torch.where(is_real, real_x, pad_x), torch.where(is_real, real_size, pad_size)


def merge_mask(merge_fn: MergeFn, mask: Tensor) -> Tensor:
    """Merge a [B, N] bool mask (True = real): a merged token is real if any member is."""
    if merge_fn is keep_all:
        return mask
    return merge_fn(mask[..., None].float(), mode="amax")[..., 0] > 0


def merge_source(merge_fn: MergeFn, source: Tensor | None, x: Tensor) -> Tensor:
    """Track which original tokens each token holds: source [B, N, N_original] (0/1) for `x` [B, N, C].

    `source` None starts from the identity (every token is itself). Costs B * N * N_original memory.
    """
    if source is None:
        b, n, _ = x.shape
        source = torch.eye(n, device=x.device, dtype=x.dtype).expand(b, n, n)
    return merge_fn(source, mode="amax")


def merge_groups(unmerge_fn: MergeFn, groups: Tensor | None, merged: int, like: Tensor) -> Tensor:
    """Where each original token went: groups [B, N_original] (long), the index among the `merged` tokens
    after this merge of the token that holds it (ToMe's source map as indices: source.argmax(1)).

    `groups` None: the tokens before this merge are the originals. `like`: a tensor of the batch's device.
    """
    b = like.shape[0]
    index = torch.arange(merged, device=like.device, dtype=torch.float32)[None, :, None].expand(b, -1, 1)
    moved = unmerge_fn(index)[..., 0].long()  # [B, N_before]: each token's merged index
    return moved if groups is None else moved.gather(1, groups)


def proportional_attention_bias(
    size: Tensor, key_padding_mask: Tensor | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """Additive attention bias [B, 1, 1, N] = log(size) on the key axis, for SDPA's `attn_mask`.

    `size` [B, N, 1] or [B, N]; `key_padding_mask` [B, N] bool (True = attend) puts -inf on padded keys.
    All sizes 1 and no padding give a zero bias, i.e. plain attention.
    """
    if size.dim() == 3:
        size = size[..., 0]
    if size.dim() != 2:
        raise ValueError(f"size must be [B, N] or [B, N, 1], got shape {tuple(size.shape)}")
    bias = size.float().log()
    if key_padding_mask is not None:
        if key_padding_mask.shape != bias.shape:
            raise ValueError(
                f"key_padding_mask must have shape {tuple(bias.shape)}, got {tuple(key_padding_mask.shape)}"
            )
        bias = bias.masked_fill(~key_padding_mask.bool(), -torch.inf)
    return bias.to(dtype or (size.dtype if size.is_floating_point() else torch.float32))[:, None, None, :]


def merge_schedule(
    r: int | list[int],
    depth: int,
    num_tokens: int,
    schedule: str = "constant",
    protected: int = 1,
    inflection: float = 0.0,
    from_all: bool = False,
) -> list[int]:
    """Tokens merged per layer, as ToMe's `parse_r` (facebookresearch/ToMe, tome/utils.py) gives them: an
    explicit per-layer list, or r with an `inflection` in [-1, 1]: layer i of L merges
    int(r(1 - inflection) + i * 2r * inflection / (L - 1)), truncated as ToMe does; 0 is a constant r,
    -1 ("decreasing", the paper's schedule) goes from 2r down to 0, +1 from 0 up to 2r. Each entry is capped
    at half the mergeable tokens left (ToMe caps in its matching), so at least `protected` + 1 tokens
    remain. A list must name every layer (ToMe pads a short one with zeros; here that is refused as a
    likely slip). `from_all`: every layer merges from all `num_tokens` (the unmerging blocks of
    `TokenMergingConfig.vision_unmerge`), so each entry is capped at `num_tokens - protected - 1` alone."""
    if depth < 1 or num_tokens < 1:
        raise ValueError(f"depth and num_tokens must be >= 1, got depth={depth}, num_tokens={num_tokens}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not -1.0 <= inflection <= 1.0:
        raise ValueError(f"inflection must lie in [-1, 1], got {inflection}")
    if schedule == "decreasing":
        if inflection not in (0.0, -1.0):
            raise ValueError(f"schedule='decreasing' is inflection -1, got inflection={inflection} as well")
        inflection = -1.0
    if isinstance(r, list):
        if len(r) != depth:
            raise ValueError(f"r as a list needs one entry per layer ({depth}), got {len(r)}")
        if schedule != "constant" or inflection != 0.0:
            raise ValueError(
                f"an explicit r list takes schedule='constant' and no inflection, got {schedule!r}"
            )
        per_layer = list(r)
    elif isinstance(r, int) and not isinstance(r, bool):
        if r < 0:
            raise ValueError(f"r must be non-negative integers, got {r}")
        low = int(r * (1.0 - inflection))
        step = (2 * r - 2 * low) / (depth - 1) if depth > 1 else 0.0
        per_layer = [int(low + step * i) for i in range(depth)]
    else:
        raise TypeError(f"r must be an int or a list of ints, got {type(r).__name__}")
    if any(not isinstance(v, int) or v < 0 for v in per_layer):
        raise ValueError(f"r must be non-negative integers, got {r}")
    if from_all:
        return [min(v, max(num_tokens - protected - 1, 0)) for v in per_layer]
    capped, n = [], num_tokens
    for v in per_layer:
        v = min(v, max(n - protected, 0) // 2)
        capped.append(v)
        n -= v
    return capped


@dataclass
class TokenMergingConfig:
    """Where and how much a `FusionBackbone` merges; all zeros is the plain model (bitwise).

    vision_r: tokens merged per ViT block (an int, or one entry per block), shaped by `schedule`
    ("constant" or "decreasing") or ToMe's `inflection` in [-1, 1] (`merge_schedule`); vision_entry_r: patch
    tokens merged once as the image enters the ViT, before its first block, by ToMe's matching on what the
    patches show (their patch embeddings, in rounds: `MergingBlock.entry_merge`), so every block runs on the
    fewer tokens and alike patches (a plain background) share one while an object keeps its own (the
    vision side's `text_entry_r`; not with `vision_unmerge`); fusion_r: image tokens merged after each fusion
    layer's cross-attention, least attended by the real text first (PuMer); text_r: caption tokens merged per
    fusion layer (unmerged again before the fused output, so it keeps length L); text_entry_r: caption tokens merged
    once as the caption enters the fusion, before its first layer (ToMe's matching on the text tower's
    output), so every fusion layer and every pass over the caption (ITM's pairs share one merge) runs on
    the shorter caption; proportional_attention: log(size)
    key bias wherever merged tokens are attended; trace_source: keep the ViT's token -> patch map;
    vision_unmerge: ToMe for Stable Diffusion's blocks instead of ToMe's: each ViT block merges `vision_r` of
    all its tokens (more than half by repeated matching on the residual stream), runs attention and MLP on the
    merged tokens and adds their outputs back to every token they hold, so each patch keeps its own token to
    the output (`ImageFeatures.grid.tokens`, what grounding's `patch_grid: tokens` reads); the output is merged
    once by the last block's r for every other reader; vision_merge_output: False keeps the unmerging ViT's
    output whole instead (every patch's token for every reader: the fusion attends 1 + N image tokens, and
    grounding reads the plain patch grid).
    """

    vision_r: int | list[int] = 0
    vision_entry_r: int = 0
    schedule: str = "constant"
    inflection: float = 0.0
    proportional_attention: bool = True
    fusion_r: int = 0
    text_r: int = 0
    text_entry_r: int = 0
    trace_source: bool = False
    vision_unmerge: bool = False
    vision_merge_output: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"merging.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not -1.0 <= self.inflection <= 1.0:
            raise ValueError(f"merging.inflection must lie in [-1, 1], got {self.inflection}")
        rs = self.vision_r if isinstance(self.vision_r, list) else [self.vision_r]
        singles = {
            name: [getattr(self, name)] for name in ("vision_entry_r", "fusion_r", "text_r", "text_entry_r")
        }
        for name, values in (("vision_r", rs), *singles.items()):
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
                raise ValueError(f"merging.{name} must be non-negative integers, got {getattr(self, name)}")
        if self.vision_entry_r and self.vision_unmerge:
            raise ValueError(
                "merging.vision_entry_r merges tokens before the ViT's first block, and merging.vision_unmerge's "
                "blocks keep a token for every patch: set one of them to 0 / false"
            )
        if not self.vision_merge_output and not self.vision_unmerge:
            raise ValueError(
                "merging.vision_merge_output: false keeps every patch's token, which only blocks that unmerge "
                "have: set merging.vision_unmerge: true (ToMe's blocks pass on the merged tokens alone)"
            )

    @property
    def merges_fusion(self) -> bool:
        return self.fusion_r > 0 or self.text_r > 0 or self.text_entry_r > 0
