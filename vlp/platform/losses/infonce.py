"""InfoNCE (CLIP) and InfoNCE with momentum soft targets and a feature queue (ALBEF).

Distributed semantics (both losses): open_clip's local loss with `gather_with_grad`. Each rank scores its
local rows [B, E] against the global batch's columns [W * B, E] (`gather_features`), positives at
`rank * B + i`; the per-rank losses averaged over ranks equal the single-process loss on the concatenated
batch, and the gather's backward makes DDP's gradient average the single-process gradient.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from vlp.platform.distributed.collectives import all_gather_many, rank
from vlp.platform.kernels._triton import Backend
from vlp.platform.kernels.contrastive_loss import contrastive_loss
from vlp.platform.losses.gather import gather_features
from vlp.platform.model.momentum import soft_cross_entropy

ScoreAgainst = Literal["online", "momentum"]


def infonce_loss(
    image: Tensor,
    text: Tensor,
    scale: Tensor,
    *,
    gather: bool = True,
    gathered: tuple[Tensor, Tensor] | None = None,
    chunk_size: int | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """CLIP's symmetric InfoNCE, 1/2 [CE(s I T^T, diag) + CE(s T I^T, diag)], I, T [B, E] L2-normalised,
    `scale` the exp'ed logit scale. `gather`: in a distributed run score against every rank's columns (module
    docstring), else the local batch only; `gathered`: those columns already gathered. Through the tiled
    kernel (`chunk_size`, `backend`: `vlp.platform.kernels.contrastive_loss`)."""
    return contrastive_loss(image, text, scale, chunk_size, gather=gather, gathered=gathered, backend=backend)


def distilled_infonce_loss(
    image: Tensor,
    text: Tensor,
    scale: Tensor,
    image_ids: Tensor,
    *,
    alpha: float = 0.0,
    momentum: tuple[Tensor, Tensor] | None = None,
    queue: tuple[Tensor, Tensor, Tensor] | None = None,
    gathered: tuple[Tensor, Tensor] | None = None,
    score_against: ScoreAgainst = "online",
) -> Tensor:
    """ALBEF's ITC: local rows against columns plus the queue, one-hot targets mixed with the momentum
    model's softmaxed similarities over the same columns,
        targets = alpha * softmax(s * I_m [T_m; Q_t]^T) + (1 - alpha) * onehot.

    image, text [B, E] (online, with gradients); image_ids [B]; `momentum`: the momentum model's (image,
    text) embeddings [B, E] (needed for alpha > 0 and for `score_against="momentum"`); `queue`: (image
    [K, E], text [K, E], ids [K]) of past batches. Queue rows of an image in the batch are masked out of both
    directions (neither negatives nor positives).

    `score_against`: the columns the online rows are scored against.
      "online" (vlp): the global batch's online embeddings (`gathered`, else gathered here with gradients)
        plus the queue; positives at `rank * B + i`.
      "momentum" (ALBEF / LAVIS pretraining): this rank's momentum embeddings plus the queue, no gradient
        through the columns, positives on the diagonal, no image-id masking of the queue. LAVIS enqueues
        the global batch's momentum embeddings, so other ranks' rows reach the loss through the queue.
    alpha = 0 and no queue with "online" is exactly `infonce_loss`.
    """
    if score_against not in ("online", "momentum"):
        raise ValueError(f"score_against must be 'online' or 'momentum', got {score_against!r}")
    if (alpha > 0 or score_against == "momentum") and momentum is None:
        raise ValueError("alpha > 0 and score_against='momentum' need the momentum model's embeddings")
    b = image.shape[0]
    queued_image, queued_text, queued_ids = (
        (image.new_zeros(0, image.shape[1]),) * 2 + (image_ids.new_zeros(0),) if queue is None else queue
    )
    if score_against == "momentum":
        image_m, text_m = momentum
        columns_image, columns_text = image_m.detach(), text_m.detach()
        positives = torch.zeros(b, b + len(queued_ids), dtype=torch.bool, device=image.device)
        positives[torch.arange(b), torch.arange(b)] = True
        hidden = torch.zeros_like(positives)
    else:
        columns_image, columns_text = gather_features(image, text, gathered=gathered)
        # queue rows of this batch's images are neither negatives nor positives: masked out of both directions
        hidden = torch.cat([torch.zeros(b, len(columns_text), dtype=torch.bool, device=image.device),
                            queued_ids[None, :] == image_ids[:, None]], dim=1)  # fmt: skip
        positives = torch.zeros_like(hidden)
        positives[torch.arange(b), rank() * b + torch.arange(b)] = True
    i2t = (scale * image @ torch.cat([columns_text, queued_text.to(text.dtype)]).T).masked_fill(
        hidden, -torch.inf
    )
    t2i = (scale * text @ torch.cat([columns_image, queued_image.to(image.dtype)]).T).masked_fill(
        hidden, -torch.inf
    )
    targets_i2t = targets_t2i = positives.float()
    if alpha > 0:
        image_m, text_m = momentum
        with torch.no_grad():
            if score_against == "momentum":
                text_m_all, image_m_all = text_m, image_m
            else:
                text_m_all, image_m_all = all_gather_many([text_m, image_m])
            text_m_all = torch.cat([text_m_all, queued_text.to(text_m.dtype)])
            image_m_all = torch.cat([image_m_all, queued_image.to(image_m.dtype)])
            soft_i2t = (scale * image_m @ text_m_all.T).masked_fill(hidden, -torch.inf).softmax(dim=1)
            soft_t2i = (scale * text_m @ image_m_all.T).masked_fill(hidden, -torch.inf).softmax(dim=1)
            targets_i2t = alpha * soft_i2t + (1 - alpha) * targets_i2t
            targets_t2i = alpha * soft_t2i + (1 - alpha) * targets_t2i
    return 0.5 * (soft_cross_entropy(i2t, targets_i2t) + soft_cross_entropy(t2i, targets_t2i))
