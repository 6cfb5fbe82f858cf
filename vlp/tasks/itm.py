"""Image-text matching with hard negatives (ALBEF ITM).

For every image one negative text, for every text one negative image, drawn from the softmaxed ITC
similarities over the GLOBAL batch (every rank's rows, as ALBEF does), so similar-but-wrong pairs are
drawn most often. A pair is never a negative when it is a positive: same image id, or exactly the same
caption (token ids), since duplicate captions describe both images; both are checked across ranks.
Binary head on the fused [CLS]; cross-entropy over B positives and 2B negatives per rank, so with DDP's
gradient averaging W ranks of batch B train exactly like one process with batch W * B.
Validation: accuracy on balanced pairs (every positive plus its hardest global-batch negative text);
the repeats a DistributedSampler pads with (`is_padding`) are mined from but never scored.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import BinaryAccuracy

from vlp.platform.distributed import all_gather_padded, rank
from vlp.platform.model.backbone import FeatureCache, FusionBackbone, ImageFeatures
from vlp.platform.optim import OptimConfig
from vlp.tasks.base import Objective, ObjectiveOutput, real_rows


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


class MatchPairs(NamedTuple):
    """(image, text) pairs for the matching head: positives first, then the mined negatives."""

    image: ImageFeatures  # tokens [P, 1 + N, Dv] (+ sizes)
    text_tokens: Tensor  # [P, L, Dt]
    attention_mask: Tensor  # [P, L]
    labels: Tensor  # [P], 1 = match
    anchor_is_real: Tensor  # [P] bool: the pair's local anchor row is not a sampler padding repeat


def global_match_pairs(
    batch: dict, features: FeatureCache, logit_scale: Tensor, hardest: bool = False
) -> MatchPairs:
    """Positives of this rank's B rows plus negatives mined from the global batch of every rank.

    Gathers (with gradients) the image tokens and text tokens of all ranks, and (without) the ITC
    embeddings, image ids, caption ids and masks; captions are zero-padded to the longest on any rank.
    Negatives are drawn for every global row with the same draw a single process would make (identical
    on each rank when their RNGs agree, as under a seeded Lightning run) and each rank keeps its own rows.
    `hardest` takes the most similar negative text instead of sampling and mines no negative images
    (validation). Identity gathers on one process.
    """
    image, text = features.image, features.text
    b = image.tokens.shape[0]
    real = real_rows(batch)
    image_ids = all_gather_padded(batch["image_id"])
    input_ids = all_gather_padded(batch["input_ids"], pad_dim=1)
    attention_mask = all_gather_padded(text.attention_mask, pad_dim=1)
    text_tokens = all_gather_padded(text.tokens, pad_dim=1, with_grad=True)
    global_image = ImageFeatures(
        *(None if field is None else all_gather_padded(field, with_grad=True) for field in image)
    )
    local = torch.arange(b, device=image.tokens.device) + rank() * b
    positives = positive_pairs(image_ids, input_ids, attention_mask)
    with torch.no_grad():
        image_emb = all_gather_padded(image.embedding)
        text_emb = all_gather_padded(text.embedding)
        similarity = image_emb @ text_emb.T * logit_scale
        if hardest:
            masked = similarity.masked_fill(positives, float("-inf"))
            neg_text, text_ok = masked.argmax(dim=1), ~positives.all(dim=1)
            image_ok = torch.zeros_like(text_ok)
            neg_image = neg_text
        else:
            neg_text, text_ok = sample_hard_negatives(similarity, positives)
            neg_image, image_ok = sample_hard_negatives(similarity.T, positives.T)
    text_ok, image_ok = text_ok[local], image_ok[local]
    image_index = torch.cat([local, local[text_ok], neg_image[local][image_ok]])
    text_index = torch.cat([local, neg_text[local][text_ok], local[image_ok]])
    labels = torch.zeros(len(image_index), dtype=torch.long, device=image_index.device)
    labels[:b] = 1
    anchor_is_real = torch.cat([real, real[text_ok], real[image_ok]])
    return MatchPairs(
        global_image.take(image_index),
        text_tokens[text_index],
        attention_mask[text_index],
        labels,
        anchor_is_real,
    )


class ITMObjective(Objective):
    """Image-text matching head on the fused [CLS] with ITC-weighted hard negatives."""

    name = "itm"

    def __init__(self, backbone: FusionBackbone, optim: OptimConfig | None = None) -> None:
        super().__init__(backbone, optim)
        self.head = nn.Linear(backbone.width, 2)
        self.val_accuracy = BinaryAccuracy()

    def match_logits(self, image: ImageFeatures, text_tokens: Tensor, attention_mask: Tensor) -> Tensor:
        """[B, 2] match / no-match logits of the fused [CLS] for each (image, text) pair."""
        return self.head(self.backbone.fuse(image, text_tokens, attention_mask)[:, 0])

    def forward_loss(self, batch: dict, features: FeatureCache) -> ObjectiveOutput:
        pairs = global_match_pairs(batch, features, self.backbone.logit_scale())
        logits = self.match_logits(pairs.image, pairs.text_tokens, pairs.attention_mask)
        loss = F.cross_entropy(logits, pairs.labels)
        accuracy = (logits.argmax(-1) == pairs.labels).float().mean()
        return ObjectiveOutput(loss, {"loss": loss, "acc": accuracy})

    def validation_update(self, batch: dict, features: FeatureCache) -> dict[str, Tensor]:
        pairs = global_match_pairs(batch, features, self.backbone.logit_scale(), hardest=True)
        logits = self.match_logits(pairs.image, pairs.text_tokens, pairs.attention_mask)
        scored = pairs.anchor_is_real
        self.val_accuracy.update(logits.argmax(-1)[scored], pairs.labels[scored])
        return {"loss": F.cross_entropy(logits, pairs.labels)}

    def validation_scores(self) -> dict[str, float]:
        if not self.val_accuracy.update_called:
            return {}
        accuracy = self.val_accuracy.compute().item()
        self.val_accuracy.reset()
        return {"val/itm/acc": accuracy}
