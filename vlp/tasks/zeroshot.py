"""Zero-shot classification (CLIP): class names in prompt templates give a text classifier; each image is
assigned the class whose averaged prompt embedding is most similar to its own.

Classifier weights: for every class, the L2-normalised text embeddings of its prompts, averaged over the
templates and normalised again [C, E]. Logits: image embedding [B, E] @ weights.T. Top-1 / top-5 accuracy
over the labelled split, logged as `val/zeroshot/{top1,top5}`. An evaluation protocol, not a training
objective: run it with `vlp validate` / `vlp test` on a labelled source (batches with `label` and, unless the
config lists `classes`, `class_names`).

Class probabilities (`vlp predict`) follow the loss the model was trained with: CLIP's InfoNCE makes the
classes compete, softmax(s * logits) over C; SigLIP's sigmoid loss scores each class on its own,
sigmoid(t * logits + b), which need not sum to one (none may fit, or several). Both are monotone in the
cosine logits, so the ranking, top-1 and top-5 are the same either way.
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
        """`classes`: class names (default: the batches' `class_names`); `templates`: prompts with one `{}`.
        Class probabilities follow how the backbone was trained: a softmax over classes (InfoNCE), or, when it
        holds SigLIP's pair bias (`logit_bias`, loaded with the rest of it), one sigmoid per class."""
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
        device = self.backbone.vision_proj.weight.device
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

    def class_logits(self, batch: dict, features: FeatureCache) -> Tensor:
        """[B, C] cosine similarity of each image to each class's prompt embedding."""
        classes = tuple(self.classes or batch.get("class_names") or ())
        if not classes:
            raise KeyError("zeroshot needs class names (config `classes` or the batches' `class_names`)")
        if self._weights is None or self._weights[0] != classes:
            self._weights = (classes, self.classifier(list(classes)))
        return features.image.embedding @ self._weights[1].T

    def class_probabilities(self, logits: Tensor) -> Tensor:
        """[B, C] from the cosine logits [B, C]: softmax over classes (InfoNCE) or one sigmoid per class."""
        scaled = self.backbone.logit_scale() * logits.float()
        if self.backbone.logit_bias is None:
            return scaled.softmax(dim=-1)
        return (scaled + self.backbone.logit_bias).sigmoid()

    @torch.no_grad()
    def predict(self, batch: dict, features: FeatureCache) -> dict[str, Tensor]:
        logits = self.class_logits(batch, features)
        return {
            "class_probabilities": self.class_probabilities(logits),
            "predicted_class": logits.argmax(dim=1),
        }

    def validation_update(self, batch: dict, features: FeatureCache) -> dict[str, Tensor]:
        if "label" not in batch or not (self.classes or batch.get("class_names")):
            raise KeyError(
                "zeroshot needs labelled batches (`label`) and class names (config `classes` or `class_names`)"
            )
        logits = self.class_logits(batch, features)
        classes = self._weights[0]
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
