"""Phrase grounding: one box for a referring phrase ("the blue square") in an image (X-VLM box head).

The phrase is encoded by the text tower, fused with the batch's shared image pass (on its patch grid when
the vision tower merges tokens), and an MLP on the fused [CLS] ends in a sigmoid that gives a normalised
(cx, cy, w, h). Unlike X-VLM's plain sigmoid, the centre is placed in the range that keeps the whole box
inside the image:
    w, h = sigmoid(.),  cx = w / 2 + (1 - w) sigmoid(.),  cy likewise,
so every prediction is a valid box. Loss (DETR / X-VLM): per box the L1 distance summed over the four
coordinates plus 1 - GIoU, each averaged over the batch and weighted (default 1 and 1, X-VLM's
pre-training weights; DETR uses 5 and 2). Validation: Acc@0.5 (IoU >= 0.5) and mean IoU over the split.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

from vlp.platform.boxes import box_cxcywh_to_xyxy, generalized_box_iou_loss
from vlp.platform.metrics import grounding_scores
from vlp.platform.model.backbone import FeatureCache, FusionBackbone, first_token
from vlp.platform.model.heads import MLPHead
from vlp.platform.optim import OptimConfig
from vlp.platform.run.visualization import MAX_IMAGES, annotate_boxes
from vlp.tasks.base import Objective, ObjectiveOutput, real_rows

BATCH_KEYS = ("phrase_input_ids", "phrase_attention_mask", "boxes")


class BoxHead(MLPHead):
    """Fused [CLS] [B, D] -> normalised cxcywh box [B, 4] that lies inside the image (X-VLM's MLP)."""

    def __init__(self, width: int) -> None:
        super().__init__(width, 4)

    def forward(self, x: Tensor) -> Tensor:
        position, size = super().forward(x).float().sigmoid().split(2, dim=-1)
        return torch.cat([size / 2 + (1 - size) * position, size], dim=-1)


class BoxLoss(NamedTuple):
    total: Tensor  # l1_weight * l1 + giou_weight * giou
    l1: Tensor  # mean over boxes of sum_coords |pred - target|
    giou: Tensor  # mean over boxes of 1 - GIoU


def box_loss(pred: Tensor, target: Tensor, l1_weight: float = 1.0, giou_weight: float = 1.0) -> BoxLoss:
    """L1 + generalised-IoU loss of normalised cxcywh boxes pred [B, 4] against target [B, 4]."""
    if pred.shape != target.shape or pred.ndim != 2 or pred.shape[-1] != 4:
        raise ValueError(
            f"pred and target must both be [B, 4], got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    target = target.to(pred.dtype)
    l1 = (pred - target).abs().sum(-1).mean()
    giou = generalized_box_iou_loss(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target))
    return BoxLoss(l1_weight * l1 + giou_weight * giou, l1, giou)


def check_grounding_batch(batch: dict) -> None:
    missing = [key for key in BATCH_KEYS if key not in batch]
    if missing:
        raise KeyError(
            f"grounding needs batch keys {list(BATCH_KEYS)}; missing {missing}: map the grounding "
            "objective to a source with referring phrases and boxes (e.g. shapes) in data.tasks"
        )
    boxes = batch["boxes"]
    if boxes.ndim != 2 or boxes.shape != (batch["phrase_input_ids"].shape[0], 4):
        raise ValueError(f"batch['boxes'] must be [B, 4] normalised cxcywh, got {tuple(boxes.shape)}")


class GroundingObjective(Objective):
    """Referring-phrase grounding: a box head on the fused [CLS] of (image, phrase), L1 + GIoU loss."""

    name = "grounding"

    def __init__(
        self,
        backbone: FusionBackbone,
        optim: OptimConfig | None = None,
        l1_weight: float = 1.0,
        giou_weight: float = 1.0,
        all_patches: bool = True,
        merge_phrase: bool = False,
        patch_grid: Literal["positions", "inputs", "tokens", "none"] = "positions",
    ) -> None:
        """`l1_weight`, `giou_weight`: weights of the two box losses (X-VLM 1 and 1, DETR 5 and 2).
        `all_patches`: fuse the image from every patch token even while `vision.patch_dropout` drops some
        for the other objectives (a box may lie on any patch; costs a second vision pass then).
        `merge_phrase`: let the backbone's text merging (`merging.text_r`, `text_entry_r`) merge the phrase
        too; off by default: a phrase is a few words that each pick the object ("the small red circle"), and
        merging them saves little.
        `patch_grid`: when the vision tower merges tokens (`merging.vision_r`), fuse the phrase with the image
        back on its patch grid (`FusionBackbone.patch_grid`): every patch gets the merged token that holds it
        plus its own position embedding (`positions`: no projection, keys and values by linearity) or the
        token that entered the ViT there (`inputs`: the patch's own pixels too; costs the fusion's keys and
        values of 1 + N tokens per image); `tokens` reads every patch's own output token, which a vision tower
        whose blocks unmerge keeps (`merging.vision_unmerge`; keys and values of 1 + N tokens per image);
        `none` reads the merged tokens. A merged token averages its patches' positions and detail, which a
        box needs."""
        super().__init__(backbone, optim)
        self.all_patches = all_patches
        self.merge_phrase = merge_phrase
        if patch_grid not in ("positions", "inputs", "tokens", "none"):
            raise ValueError(
                f"patch_grid must be 'positions', 'inputs', 'tokens' or 'none', got {patch_grid!r}"
            )
        self.patch_grid = patch_grid
        for arg, value in (("l1_weight", l1_weight), ("giou_weight", giou_weight)):
            if value < 0:
                raise ValueError(f"{arg} must be >= 0, got {value}")
        if l1_weight == 0 and giou_weight == 0:
            raise ValueError("l1_weight and giou_weight are both 0: the box head would get no loss")
        self.l1_weight = l1_weight
        self.giou_weight = giou_weight
        self.head = BoxHead(backbone.width)
        self.val_acc50 = MeanMetric()
        self.val_miou = MeanMetric()

    def predict_boxes(self, batch: dict, features: FeatureCache) -> Tensor:
        """Normalised cxcywh boxes [B, 4] for the batch's phrases in its images."""
        check_grounding_batch(batch)
        phrase = self.backbone.encode_text(batch["phrase_input_ids"], batch["phrase_attention_mask"])
        cls = first_token(phrase.tokens.shape[0], phrase.tokens.device)
        image = features.fused_image_all_patches if self.all_patches else features.fused_image
        if self.patch_grid != "none":
            image = self.backbone.patch_grid(image, self.patch_grid)
        fused = self.backbone.fuse(
            image, phrase.tokens, phrase.attention_mask, merge_text=self.merge_phrase, positions=cls
        )
        return self.head(fused[:, 0])

    def forward_loss(self, batch: dict, features: FeatureCache) -> ObjectiveOutput:
        pred = self.predict_boxes(batch, features)
        loss = box_loss(pred, batch["boxes"], self.l1_weight, self.giou_weight)
        return ObjectiveOutput(loss.total, {"loss": loss.total, "l1": loss.l1, "giou": loss.giou})

    def validation_update(self, batch: dict, features: FeatureCache) -> dict[str, Tensor]:
        pred = self.predict_boxes(batch, features)
        loss = box_loss(pred, batch["boxes"], self.l1_weight, self.giou_weight)
        real = real_rows(batch)
        if real.any():
            scores = grounding_scores(pred[real], batch["boxes"][real].to(pred.dtype))
            self.val_acc50.update(scores["acc50"], weight=int(real.sum()))
            self.val_miou.update(scores["miou"], weight=int(real.sum()))
        return {"loss": loss.total}

    def validation_scores(self) -> dict[str, float]:
        if not self.val_acc50.update_called:
            return {}
        scores = {
            "val/grounding/acc50": self.val_acc50.compute().item(),
            "val/grounding/miou": self.val_miou.compute().item(),
        }
        self.val_acc50.reset()
        self.val_miou.reset()
        return scores

    @torch.no_grad()
    def predict(self, batch: dict, features: FeatureCache) -> dict[str, Tensor]:
        return {"boxes": self.predict_boxes(batch, features)}

    @torch.no_grad()
    def validation_images(self, batch: dict, features: FeatureCache) -> dict[str, Tensor]:
        """The first (at most 8) images, target box green, predicted box red, phrase below: uint8 [N, 3, H', W']."""
        pred = self.predict_boxes(batch, features)
        phrases = batch.get("phrases") or self.backbone.tokenizer.batch_decode(
            batch["phrase_input_ids"], skip_special_tokens=True
        )
        images = annotate_boxes(batch["image"], phrases, batch["boxes"], pred, max_images=MAX_IMAGES)
        return {"val/grounding/boxes": images}
