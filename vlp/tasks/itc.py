"""Image-text contrastive learning (CLIP / ALBEF ITC).

Loss: symmetric InfoNCE over the batch with the backbone's learnable temperature,
    L = 1/2 [CE(s * I T^T, diag) + CE(s * T I^T, diag)],  I, T L2-normalised [B, E],
through `vlp.platform.kernels.contrastive_loss`, which in distributed runs scores the local rows against
columns gathered from every rank with gradients (open_clip's local loss) and never builds the full
B x B matrix when chunked. Validation: retrieval R@1/5/10 both ways over the whole val split, every caption
of an image a text of its own (`vlp.tasks.retrieval_split`): image -> text is right when any of the image's
captions is in the top K, text -> image when the caption's one image is.

With the backbone's momentum model (ALBEF), two switches: `queue_size` keeps the momentum embeddings of past
batches (gathered over ranks) as extra negative columns, and `alpha` mixes the one-hot targets with the
momentum model's softmaxed similarities over the same columns,
    targets = alpha * softmax(s * I_m [T_m; Q_t]^T) + (1 - alpha) * onehot,
ramped up over `alpha_warmup_steps`. Queue rows of an image in the batch are masked out (they are neither
its negatives nor counted as positives). alpha = 0 and no queue is exactly the loss above.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlp.platform.distributed.collectives import all_gather_many, is_distributed, rank
from vlp.platform.kernels import contrastive_loss
from vlp.platform.metrics import retrieval_recall
from vlp.platform.model.backbone import FeatureCache, FusionBackbone
from vlp.platform.model.momentum import FeatureQueue, ramped_alpha, soft_cross_entropy
from vlp.platform.optim import OptimConfig
from vlp.tasks.base import Objective, ObjectiveOutput, check_distillation, real_rows
from vlp.tasks.global_rows import global_rows
from vlp.tasks.retrieval_split import SplitRows, retrieval_texts, unique_images


class ITCObjective(Objective):
    """Image-text contrastive objective; `chunk_size` tiles the similarity matrix to save memory."""

    name = "itc"
    reads_global_rows = True

    def __init__(
        self,
        backbone: FusionBackbone,
        optim: OptimConfig | None = None,
        chunk_size: int | None = None,
        alpha: float = 0.0,
        alpha_warmup_steps: int = 0,
        queue_size: int = 0,
    ):
        """`alpha`: weight of the momentum model's soft targets (ALBEF: 0.4), reached after
        `alpha_warmup_steps`; `queue_size`: momentum embeddings kept as extra negatives (ALBEF: 65536)."""
        super().__init__(backbone, optim)
        check_distillation("itc", backbone, alpha, alpha_warmup_steps)
        if queue_size < 0:
            raise ValueError(f"itc: queue_size must be >= 0, got {queue_size}")
        if queue_size > 0 and backbone.momentum is None:
            raise ValueError(
                "itc: queue_size > 0 fills the queue from the backbone's momentum model; "
                "set backbone.init_args.momentum: {decay: 0.995}"
            )
        self.chunk_size = chunk_size
        self.alpha, self.alpha_warmup_steps = alpha, alpha_warmup_steps
        self.queue = FeatureQueue(queue_size, backbone.vision_proj.out_features) if queue_size else None
        self.val_images, self.val_texts = SplitRows(("embedding",)), SplitRows(("embedding",))

    def forward_loss(self, batch: dict, features: FeatureCache) -> ObjectiveOutput:
        scale = self.backbone.logit_scale()
        alpha = ramped_alpha(self.alpha, self.alpha_warmup_steps, self.current_step(batch))
        if self.queue is None and alpha == 0:
            shared = features.share_global_rows and is_distributed()
            gathered = self.global_columns(features) if shared else None
            loss = contrastive_loss(
                features.image.embedding,
                features.text.embedding,
                scale,
                chunk_size=self.chunk_size,
                gathered=gathered,
            )
            return ObjectiveOutput(loss, {"loss": loss, "logit_scale": scale})
        loss = self.distilled_loss(batch, features, scale, alpha)
        return ObjectiveOutput(loss, {"loss": loss, "logit_scale": scale, "alpha": torch.tensor(alpha)})

    def global_columns(self, features: FeatureCache) -> tuple[Tensor, Tensor]:
        """Every rank's (image, text) embeddings [W * B, E] with gradients: from the step's one gather when
        ITM gathers too (`features.share_global_rows`), else a gather of their own."""
        if features.share_global_rows:
            rows = global_rows(features)
            return rows.image.embedding, rows.text_embedding
        image, text = all_gather_many([features.image.embedding, features.text.embedding], with_grad=True)
        return image, text

    def distilled_loss(self, batch: dict, features: FeatureCache, scale: Tensor, alpha: float) -> Tensor:
        """Local rows against the global batch's columns and the queue, soft targets by `alpha` (ALBEF)."""
        image, text = features.image.embedding, features.text.embedding
        b = image.shape[0]
        image_all, text_all = self.global_columns(features)
        ids = batch["image_id"]
        queued_image, queued_text, queued_ids = (
            (image.new_zeros(0, image.shape[1]),) * 2 + (ids.new_zeros(0),)
            if self.queue is None
            else self.queue.contents()
        )
        # queue rows of this batch's images are neither negatives nor positives: masked out of both directions
        hidden = torch.cat([torch.zeros(b, len(text_all), dtype=torch.bool, device=image.device),
                            queued_ids[None, :] == ids[:, None]], dim=1)  # fmt: skip
        positives = torch.zeros_like(hidden)
        positives[torch.arange(b), rank() * b + torch.arange(b)] = True
        i2t = (scale * image @ torch.cat([text_all, queued_text.to(text.dtype)]).T).masked_fill(
            hidden, -torch.inf
        )
        t2i = (scale * text @ torch.cat([image_all, queued_image.to(image.dtype)]).T).masked_fill(
            hidden, -torch.inf
        )
        targets_i2t = targets_t2i = positives.float()
        image_m = text_m = None
        if self.backbone.momentum is not None:
            image_m, text_m = features.momentum_image.embedding, features.momentum_text.embedding
        if alpha > 0:
            with torch.no_grad():
                text_m_all, image_m_all = all_gather_many([text_m, image_m])
                text_m_all = torch.cat([text_m_all, queued_text.to(text_m.dtype)])
                image_m_all = torch.cat([image_m_all, queued_image.to(image_m.dtype)])
                soft_i2t = (scale * image_m @ text_m_all.T).masked_fill(hidden, -torch.inf).softmax(dim=1)
                soft_t2i = (scale * text_m @ image_m_all.T).masked_fill(hidden, -torch.inf).softmax(dim=1)
                targets_i2t = alpha * soft_i2t + (1 - alpha) * targets_i2t
                targets_t2i = alpha * soft_t2i + (1 - alpha) * targets_t2i
        loss = 0.5 * (soft_cross_entropy(i2t, targets_i2t) + soft_cross_entropy(t2i, targets_t2i))
        if self.queue is not None and self.training and torch.is_grad_enabled():
            self.queue.enqueue(image_m, text_m, ids)
        return loss

    def validation_update(self, batch: dict, features: FeatureCache) -> dict[str, Tensor]:
        image_emb, text_emb = features.image.embedding, features.text.embedding
        self.val_images.update(batch["image_id"], real_rows(batch), embedding=image_emb)
        texts = retrieval_texts(batch, features)
        self.val_texts.update(texts.image_id, texts.real, embedding=texts.features.embedding)
        loss = contrastive_loss(image_emb, text_emb, self.backbone.logit_scale(), gather=False)
        return {"loss": loss}

    def validation_scores(self) -> dict[str, float]:
        if not self.val_images.update_called:
            return {}
        images, texts = unique_images(self.val_images.pop()), self.val_texts.pop()
        similarity = images["embedding"].float() @ texts["embedding"].float().T
        scores = retrieval_recall(similarity, text_image_ids=texts["image_id"], image_ids=images["image_id"])
        return {f"val/retrieval/{key}": value for key, value in scores.items()}

    @torch.no_grad()
    def predict(self, batch: dict, features: FeatureCache) -> dict:
        return {"image_embedding": features.image.embedding, "text_embedding": features.text.embedding}
