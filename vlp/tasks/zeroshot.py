"""Zero-shot classification (CLIP): class names in prompt templates give a text classifier; each image is
assigned the class whose averaged prompt embedding is most similar to its own.

Classifier weights: for every class, the L2-normalised text embeddings of its prompts, averaged over the
templates and normalised again [C, E]. Logits: image embedding [B, E] @ weights.T. Top-1 / top-5 accuracy
over the labelled split, logged as `val/zeroshot/{top1,top5}`. An evaluation protocol, not a training
objective: run it with `vlp validate` / `vlp test` on a labelled source (batches with `label` and, unless the
config lists `classes`, `class_names`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.aggregation import MeanMetric

from vlp.platform.model.backbone import FeatureCache, FusionBackbone
from vlp.platform.optim import OptimConfig
from vlp.tasks.base import Objective, ObjectiveOutput

TEMPLATES = ("a {}", "there is a {}", "a small {}", "a large {}")  # words the shapes vocabulary knows


class ZeroShotObjective(Objective):
    """CLIP-style zero-shot classification with prompt templates (evaluation only)."""

    name = "zeroshot"

    def __init__(
        self,
        backbone: FusionBackbone,
        optim: OptimConfig | None = None,
        classes: list[str] | None = None,
        templates: list[str] | None = None,
    ) -> None:
        """`classes`: class names (default: the batches' `class_names`); `templates`: prompts with one `{}`."""
        super().__init__(backbone, optim)
        self.classes = classes
        self.templates = list(templates or TEMPLATES)
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise ValueError(f"zeroshot: every template needs exactly one '{{}}', got {self.templates}")
        self.val_top1, self.val_top5 = MeanMetric(), MeanMetric()
        self._weights: tuple[tuple[str, ...], Tensor] | None = None

    @torch.no_grad()
    def classifier(self, classes: list[str]) -> Tensor:
        """[C, E]: per class the normalised mean of its normalised prompt embeddings."""
        tokenizer = self.backbone.tokenizer
        prompts = [template.format(name) for name in classes for template in self.templates]
        encoded = tokenizer(
            prompts,
            padding="longest",
            truncation=True,
            max_length=self.backbone.text.max_len,
            return_tensors="pt",
        )
        device = self.backbone.log_logit_scale.device
        embeddings = self.backbone.encode_text(
            encoded["input_ids"].to(device), encoded["attention_mask"].to(device)
        ).embedding
        mean = embeddings.view(len(classes), len(self.templates), -1).mean(dim=1)
        return torch.nn.functional.normalize(mean, dim=-1)

    def forward_loss(self, batch: dict, features: FeatureCache) -> ObjectiveOutput:
        raise RuntimeError(
            "zeroshot is an evaluation protocol, not a training objective: run it with `vlp validate` or "
            "`vlp test` (configs/finetune/zeroshot-shapes.yaml), not in `vlp fit`"
        )

    def validation_update(self, batch: dict, features: FeatureCache) -> dict[str, Tensor]:
        classes = tuple(self.classes or batch.get("class_names") or ())
        if not classes or "label" not in batch:
            raise KeyError(
                "zeroshot needs labelled batches (`label`) and class names (config `classes` or `class_names`)"
            )
        if self._weights is None or self._weights[0] != classes:
            self._weights = (classes, self.classifier(list(classes)))
        logits = features.image.embedding @ self._weights[1].T
        top = logits.topk(min(5, len(classes)), dim=1).indices
        hits = top == batch["label"][:, None]
        self.val_top1.update(hits[:, 0].float().mean(), weight=len(hits))
        self.val_top5.update(hits.any(dim=1).float().mean(), weight=len(hits))
        return {}

    def validation_scores(self) -> dict[str, float]:
        self._weights = None  # the text tower changes between validations
        if not self.val_top1.update_called:
            return {}
        scores = {
            "val/zeroshot/top1": self.val_top1.compute().item(),
            "val/zeroshot/top5": self.val_top5.compute().item(),
        }
        self.val_top1.reset()
        self.val_top5.reset()
        return scores
