"""Image-text matching with hard negatives (ALBEF ITM).

For every image one negative text, for every text one negative image, drawn from the softmaxed in-batch
ITC similarities, so similar-but-wrong pairs are drawn most often. A pair is never a negative when it is
a positive: same image id, or exactly the same caption (token ids), since duplicate captions describe
both images. Binary head on the fused [CLS]; cross-entropy over B positives and 2B negatives. The 3B fused passes share
what does not depend on the pair: each caption's first fusion self-attention, each image's fusion keys and
values, and only [CLS] runs through the last fusion layer (exact: the same loss and gradients).
Validation: accuracy on balanced pairs (every positive plus its hardest in-batch negative text).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import BinaryAccuracy

from vlp.platform.model.backbone import FeatureCache, FusionBackbone, ImageFeatures, TextFeatures, first_token
from vlp.platform.optim import OptimConfig
from vlp.tasks.base import Objective, ObjectiveOutput


def positive_pairs(image_ids: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """[B, B] bool: True where image i and text j match (same image id, or identical caption tokens)."""
    same_image = image_ids[:, None] == image_ids[None, :]
    tokens = input_ids * attention_mask
    same_text = (tokens[:, None, :] == tokens[None, :, :]).all(-1) & (
        attention_mask.sum(-1)[:, None] == attention_mask.sum(-1)[None, :]
    )
    return same_image | same_text


def sample_hard_negatives(
    similarity: Tensor, positives: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Draw one negative column per row of `similarity` [B, B] (logits), never a positive.

    Returns (indices [B], valid [B]); `valid` is False for rows whose every column is a positive
    (e.g. a batch of one caption repeated), which then get no negative.
    """
    logits = similarity.float().masked_fill(positives, float("-inf"))
    valid = ~positives.all(dim=1)
    weights = torch.softmax(logits[valid], dim=1)
    indices = torch.zeros(similarity.shape[0], dtype=torch.long, device=similarity.device)
    if valid.any():
        indices[valid] = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    return indices, valid


class ITMObjective(Objective):
    """Image-text matching head on the fused [CLS] with ITC-weighted hard negatives."""

    name = "itm"

    def __init__(self, backbone: FusionBackbone, optim: OptimConfig | None = None) -> None:
        super().__init__(backbone, optim)
        self.head = nn.Linear(backbone.width, 2)
        self.val_accuracy = BinaryAccuracy()

    def pair_logits(
        self, image: ImageFeatures, text: TextFeatures, image_index: Tensor, text_index: Tensor
    ) -> Tensor:
        """[K, 2] match / no-match logits of the pairs (image image_index[k], text text_index[k]).

        The work a pair shares is done once: each caption's first fusion self-attention (it reads no
        image) and each image's fusion keys and values are gathered, not recomputed, and the last fusion
        layer runs the [CLS] query alone, the only token the head reads.
        """
        mask = text.attention_mask[text_index]
        pairs = image.take(image_index)
        cls = first_token(len(text_index), mask.device)
        attended = self.backbone.first_self_attention(text.tokens, text.attention_mask)
        if attended is None:  # token merging inside fusion: nothing to share
            fused = self.backbone.fuse(pairs, text.tokens[text_index], mask, positions=cls)
        else:
            fused = self.backbone.fuse(pairs, attended[text_index], mask, positions=cls, self_attended=True)
        return self.head(fused[:, 0])

    def forward_loss(self, batch: dict, features: FeatureCache) -> ObjectiveOutput:
        image, text = features.fused_image, features.text
        positives = positive_pairs(batch["image_id"], batch["input_ids"], text.attention_mask)
        with torch.no_grad():
            similarity = image.embedding @ text.embedding.T * self.backbone.logit_scale()
            neg_text, text_ok = sample_hard_negatives(similarity, positives)
            neg_image, image_ok = sample_hard_negatives(similarity.T, positives.T)
        b = image.tokens.shape[0]
        everyone = torch.arange(b, device=image.tokens.device)
        image_index = torch.cat([everyone, everyone[text_ok], neg_image[image_ok]])
        text_index = torch.cat([everyone, neg_text[text_ok], everyone[image_ok]])
        logits = self.pair_logits(image, text, image_index, text_index)
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        labels[:b] = 1
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return ObjectiveOutput(loss, {"loss": loss, "acc": accuracy})

    def validation_update(self, batch: dict, features: FeatureCache) -> dict[str, Tensor]:
        image, text = features.fused_image, features.text
        positives = positive_pairs(batch["image_id"], batch["input_ids"], text.attention_mask)
        similarity = (image.embedding @ text.embedding.T).masked_fill(positives, float("-inf"))
        valid = ~positives.all(dim=1)
        everyone = torch.arange(similarity.shape[0], device=similarity.device)
        text_index = torch.cat([everyone, similarity.argmax(dim=1)[valid]])
        logits = self.pair_logits(image, text, torch.cat([everyone, everyone[valid]]), text_index)
        labels = (torch.arange(len(text_index), device=logits.device) < len(everyone)).long()
        self.val_accuracy.update(logits.argmax(-1), labels)
        return {"loss": F.cross_entropy(logits, labels)}

    def validation_scores(self) -> dict[str, float]:
        if not self.val_accuracy.update_called:
            return {}
        accuracy = self.val_accuracy.compute().item()
        self.val_accuracy.reset()
        return {"val/itm/acc": accuracy}
