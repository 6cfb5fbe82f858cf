"""Image-text matching with hard negatives (ALBEF ITM).

For every image one negative text, for every text one negative image, drawn from the softmaxed in-batch
ITC similarities, so similar-but-wrong pairs are drawn most often. A pair is never a negative when it is
a positive: same image id, or exactly the same caption (token ids), since duplicate captions describe
both images. Binary head on the fused [CLS]; cross-entropy over B positives and 2B negatives. The 3B fused passes share
what does not depend on the pair: each caption's first fusion self-attention, each image's fusion keys and
values, and only [CLS] runs through the last fusion layer (exact: the same loss and gradients).
Validation: accuracy on balanced pairs (every positive plus its hardest in-batch negative text); with
`rerank_k`, retrieval over the whole split re-ranked by this head (`vlp.tasks.itm_rerank`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.aggregation import CatMetric
from torchmetrics.classification import BinaryAccuracy

from vlp.platform.metrics import retrieval_recall
from vlp.platform.model.backbone import FeatureCache, FusionBackbone, ImageFeatures, TextFeatures, first_token
from vlp.platform.optim import OptimConfig
from vlp.tasks.base import Objective, ObjectiveOutput
from vlp.tasks.itc import first_occurrences
from vlp.tasks.itm_rerank import rerank_scores

SPLIT_KEYS = ("image_embedding", "text_embedding", "image_tokens", "text_tokens", "text_mask", "image_id")


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

    def __init__(
        self,
        backbone: FusionBackbone,
        optim: OptimConfig | None = None,
        rerank_k: int = 0,
        rerank_chunk: int = 256,
    ) -> None:
        """`rerank_k` > 0: validation also ranks the whole split by ITC and re-scores each query's top
        `rerank_k` with this head (`val/retrieval_itm/*`; ALBEF uses 128 on COCO); `rerank_chunk` pairs go
        through fusion at a time."""
        super().__init__(backbone, optim)
        if rerank_k < 0 or rerank_chunk < 1:
            raise ValueError(f"rerank_k must be >= 0 and rerank_chunk >= 1, got {rerank_k}, {rerank_chunk}")
        self.rerank_k, self.rerank_chunk = rerank_k, rerank_chunk
        self.head = nn.Linear(backbone.width, 2)
        self.val_accuracy = BinaryAccuracy()
        # the split's unimodal features, kept for re-ranking (synced over ranks by torchmetrics)
        self.val_split = nn.ModuleDict(
            {key: CatMetric(nan_strategy="disable") for key in SPLIT_KEYS} if rerank_k else {}
        )

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
        if self.rerank_k:
            self.keep_for_reranking(batch, image, text)
        return {"loss": F.cross_entropy(logits, labels)}

    def validation_scores(self) -> dict[str, float]:
        if not self.val_accuracy.update_called:
            return {}
        accuracy = self.val_accuracy.compute().item()
        self.val_accuracy.reset()
        return {"val/itm/acc": accuracy, **self.reranked_retrieval()}

    def keep_for_reranking(self, batch: dict, image: ImageFeatures, text: TextFeatures) -> None:
        """Store the batch's unimodal features (captions padded to `text.max_len`) for `reranked_retrieval`."""
        pad = self.backbone.text.max_len - text.tokens.shape[1]
        values = {
            "image_embedding": image.embedding,
            "text_embedding": text.embedding,
            "image_tokens": image.tokens,
            "text_tokens": F.pad(text.tokens, (0, 0, 0, pad)),
            "text_mask": F.pad(text.attention_mask, (0, pad)).to(image.tokens.dtype),
            "image_id": batch["image_id"].to(image.tokens.dtype),
        }
        for key, value in values.items():
            self.val_split[key].update(value)

    @torch.no_grad()
    def reranked_retrieval(self) -> dict[str, float]:
        """R@1/5/10 both ways after re-scoring each query's ITC top `rerank_k` with the ITM head."""
        if not self.rerank_k or not self.val_split["image_id"].update_called:
            return {}
        split = {key: metric.compute() for key, metric in self.val_split.items()}
        for metric in self.val_split.values():
            metric.reset()
        ids = split.pop("image_id").long()
        *values, ids = first_occurrences(ids, *split.values())
        split = dict(zip(split, values, strict=True))
        similarity = split["image_embedding"].float() @ split["text_embedding"].float().T
        mask = split["text_mask"].long()

        def match_logit(image_rows: Tensor, text_rows: Tensor) -> Tensor:
            length = int(mask[text_rows].sum(1).max())
            image = self.backbone.with_fusion_keys(
                ImageFeatures(split["image_tokens"][image_rows], split["image_embedding"][image_rows])
            )
            cls = first_token(len(text_rows), mask.device)
            text_tokens, text_mask = split["text_tokens"][text_rows, :length], mask[text_rows, :length]
            return self.head(self.backbone.fuse(image, text_tokens, text_mask, positions=cls)[:, 0])[:, 1]

        i2t, t2i = rerank_scores(similarity, self.rerank_k, match_logit, self.rerank_chunk)
        scores = {
            **{k: v for k, v in retrieval_recall(i2t, ids, ids).items() if k.startswith("i2t")},
            **{k: v for k, v in retrieval_recall(t2i, ids, ids).items() if k.startswith("t2i")},
        }
        return {f"val/retrieval_itm/{key}": value for key, value in scores.items()}
