"""Image-text contrastive learning (CLIP / ALBEF ITC).

Loss: symmetric InfoNCE over the batch with the backbone's learnable temperature,
    L = 1/2 [CE(s * I T^T, diag) + CE(s * T I^T, diag)],  I, T L2-normalised [B, E],
through `vlp.platform.kernels.contrastive_loss`, which in distributed runs scores the local rows against
columns gathered from every rank with gradients (open_clip's local loss) and never builds the full
B x B matrix when chunked. Validation: retrieval R@1/5/10 both ways over the whole val split.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.aggregation import CatMetric

from vlp.platform.kernels import contrastive_loss
from vlp.platform.metrics import retrieval_recall
from vlp.platform.model.backbone import FeatureCache, FusionBackbone
from vlp.platform.optim import OptimConfig
from vlp.tasks.base import Objective, ObjectiveOutput


def first_occurrences(ids: Tensor, *values: Tensor) -> tuple[Tensor, ...]:
    """Drop repeated ids (DistributedSampler pads the last batch with repeats) from values [N, ...]."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(len(ids), device=ids.device)
    first = torch.full_like(unique, len(ids)).scatter_reduce(0, inverse, positions, "amin")
    return (*(v[first] for v in values), ids[first])


class ITCObjective(Objective):
    """Image-text contrastive objective; `chunk_size` tiles the similarity matrix to save memory."""

    name = "itc"

    def __init__(
        self, backbone: FusionBackbone, optim: OptimConfig | None = None, chunk_size: int | None = None
    ):
        super().__init__(backbone, optim)
        self.chunk_size = chunk_size
        self.val_image_emb = CatMetric(nan_strategy="disable")
        self.val_text_emb = CatMetric(nan_strategy="disable")
        self.val_image_ids = CatMetric(nan_strategy="disable")

    def forward_loss(self, batch: dict, features: FeatureCache) -> ObjectiveOutput:
        scale = self.backbone.logit_scale()
        loss = contrastive_loss(
            features.image.embedding, features.text.embedding, scale, chunk_size=self.chunk_size
        )
        return ObjectiveOutput(loss, {"loss": loss, "logit_scale": scale})

    def validation_update(self, batch: dict, features: FeatureCache) -> dict[str, Tensor]:
        image_emb, text_emb = features.image.embedding, features.text.embedding
        self.val_image_emb.update(image_emb)
        self.val_text_emb.update(text_emb)
        self.val_image_ids.update(batch["image_id"].to(image_emb.dtype))
        loss = contrastive_loss(image_emb, text_emb, self.backbone.logit_scale(), gather=False)
        return {"loss": loss}

    def validation_scores(self) -> dict[str, float]:
        if not self.val_image_ids.update_called:
            return {}
        image_emb, text_emb = self.val_image_emb.compute(), self.val_text_emb.compute()
        ids = self.val_image_ids.compute().long()
        image_emb, text_emb, ids = first_occurrences(ids, image_emb, text_emb)
        for metric in (self.val_image_emb, self.val_text_emb, self.val_image_ids):
            metric.reset()
        scores = retrieval_recall(image_emb.float() @ text_emb.float().T, text_image_ids=ids, image_ids=ids)
        return {f"val/retrieval/{key}": value for key, value in scores.items()}

    @torch.no_grad()
    def predict(self, batch: dict, features: FeatureCache) -> dict:
        return {"image_embedding": features.image.embedding, "text_embedding": features.text.embedding}
