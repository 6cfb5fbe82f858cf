"""SigLIP's pairwise sigmoid loss ("Sigmoid Loss for Language Image Pre-Training", Zhai et al. 2023), across
ranks by neighbour exchange instead of a global gather.

    L = 1/B sum_i sum_j -log sigmoid(z_ij (t <x_i, y_j> + b)),   z_ij = +1 for a positive pair, -1 otherwise,

over this rank's images i [B] and every rank's texts j. Positives: the pair itself, and (when the caller
passes them) every pair of the same image id or of an identical caption, since a duplicate caption describes
both images; the same rule as vlp's ITM negatives.

Distributed (open_clip's `SigLipLoss(dist_impl="shift" | "bidir")`): each rank scores its images against
its own texts, then against each other rank's texts as they arrive around the ring (`exchange="ring"`: W - 1
shifts to the right; `"bidirectional"`: blocks travel both ways, about W / 2 rounds). The texts travel with
gradients, so each rank's loss reaches every text's owner; the mean over ranks of the per-rank losses is
the single-process loss of the W * B batch, and DDP's gradient average its gradient. Only [B, E] blocks
move, and each block's logits go through the tiled kernel: no [B, W * B] tensor exists on any rank.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from vlp.platform.distributed.collectives import is_distributed, rank, world_size
from vlp.platform.distributed.ring_exchange import shift_both_ways, shift_right
from vlp.platform.kernels._triton import Backend
from vlp.platform.kernels.sigmoid_contrastive_loss import sigmoid_contrastive_loss

Exchange = Literal["ring", "bidirectional"]


def _pair_keys(image_ids: Tensor | None, captions: Tensor | None, batch: int, device: torch.device) -> Tensor:
    """[B, 1 + L] int64: the image id, then the caption tokens (one row per pair), what duplicates compare."""
    # without image ids each pair is its own image: its global row number
    ids = rank() * batch + torch.arange(batch, device=device) if image_ids is None else image_ids.to(device)
    parts = [ids.long()[:, None]]
    if captions is not None:
        parts.append(captions.long().to(device))
    return torch.cat(parts, dim=1)


def positive_pairs(image_keys: Tensor, text_keys: Tensor, tile: int = 2048) -> Tensor:
    """[P, 2] (image row, text row) pairs that match: same image id (column 0) or, when keys carry caption
    tokens (columns 1:), the identical caption. Compared `tile` image rows at a time: [tile, K] booleans."""
    ids_a, ids_b = image_keys[:, 0], text_keys[:, 0]
    captions = image_keys.shape[1] > 1
    if captions:
        _, classes = torch.unique(
            torch.cat([image_keys[:, 1:], text_keys[:, 1:]]), dim=0, return_inverse=True
        )
        class_a, class_b = classes[: len(image_keys)], classes[len(image_keys) :]
    pairs = []
    for i in range(0, len(image_keys), tile):
        match = ids_a[i : i + tile, None] == ids_b[None, :]
        if captions:
            match |= class_a[i : i + tile, None] == class_b[None, :]
        found = match.nonzero()
        found[:, 0] += i
        pairs.append(found)
    return torch.cat(pairs)


def sigmoid_loss(
    image: Tensor,
    text: Tensor,
    scale: Tensor,
    bias: Tensor,
    *,
    image_ids: Tensor | None = None,
    captions: Tensor | None = None,
    exchange: Exchange = "bidirectional",
    chunk_size: int | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """This rank's SigLIP loss (module docstring). image, text [B, E] L2-normalised pairs; scale (t, already
    exp'ed) and bias (b): one-element tensors with gradients. `image_ids` [B] and `captions` [B, L] (token
    ids with padding zeroed, the same L on every rank): duplicates are positives; without either, only the
    pairs themselves (open_clip). `exchange`: "ring" or "bidirectional" in a distributed run; every rank
    must hold the same B. `chunk_size`, `backend`: the tiled kernel's
    (`vlp.platform.kernels.sigmoid_contrastive_loss`)."""
    if exchange not in ("ring", "bidirectional"):
        raise ValueError(f"exchange must be 'ring' or 'bidirectional', got {exchange!r}")
    if image.shape != text.shape:
        raise ValueError(f"image and text must both be [B, E], got {tuple(image.shape)}, {tuple(text.shape)}")
    duplicates = image_ids is not None or captions is not None
    keys = _pair_keys(image_ids, captions, image.shape[0], image.device) if duplicates else None
    tile = chunk_size or 2048

    def block(texts: Tensor, text_keys: Tensor | None, own: bool) -> Tensor:
        if keys is not None:
            positives = positive_pairs(keys, text_keys, tile)
        else:
            positives = None if own else torch.zeros(0, 2, dtype=torch.long, device=image.device)
        return sigmoid_contrastive_loss(
            image, texts, scale, bias, chunk_size, positives=positives, backend=backend
        )

    loss = block(text, keys, own=True)
    if not is_distributed():
        return loss
    shift_keys = keys is not None
    rounds, one_way = (0, world_size() - 1) if exchange == "ring" else divmod(world_size() - 1, 2)
    to_left = to_right = text
    keys_left = keys_right = keys
    for _ in range(rounds):
        from_left, from_right = shift_both_ways(to_left, to_right)
        if shift_keys:
            keys_from_left, keys_from_right = shift_both_ways(keys_left, keys_right)
        else:
            keys_from_left = keys_from_right = None
        loss = (
            loss + block(from_left, keys_from_left, own=False) + block(from_right, keys_from_right, own=False)
        )
        to_left, to_right, keys_left, keys_right = from_right, from_left, keys_from_right, keys_from_left
    for _ in range(one_way):
        to_right = shift_right(to_right)
        keys_right = shift_right(keys_right) if shift_keys else None
        loss = loss + block(to_right, keys_right, own=False)
    return loss
