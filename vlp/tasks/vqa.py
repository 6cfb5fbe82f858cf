"""Visual question answering as classification over an answer vocabulary (ViLT / METER).

The question is encoded by the text tower and fused with the batch's shared image pass; an MLP on the
fused [CLS] gives one logit per candidate answer [B, A]. Targets are soft: each candidate's VQA accuracy
against the human answers (`answer_scores` [B, A] from the source, see `vlp.platform.metrics.vqa_accuracy`),
and the loss is binary cross-entropy with logits summed over answers and averaged over the batch (ViLT's
`binary_cross_entropy_with_logits(...) * A`). The predicted answer is the arg-max; its accuracy is the
target score there, so `val/vqa/acc` is the standard VQA accuracy (answers outside the vocabulary score
0, as they would in the official evaluation), also per answer type (`yes/no`, `number`, `other`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from vlp.platform.model.backbone import FeatureCache, FusionBackbone, first_token
from vlp.platform.model.heads import MLPHead
from vlp.platform.optim import OptimConfig
from vlp.platform.run.visualization import MAX_IMAGES, annotate_captions
from vlp.tasks.base import Objective, ObjectiveOutput, real_rows

BATCH_KEYS = ("question_input_ids", "question_attention_mask", "answer_scores")
ANSWER_TYPES = ("yes/no", "number", "other")


def vqa_loss(logits: Tensor, answer_scores: Tensor) -> Tensor:
    """BCE with logits against soft scores, summed over the A answers and averaged over the batch."""
    return F.binary_cross_entropy_with_logits(logits.float(), answer_scores.float()) * answer_scores.shape[1]


class VQAObjective(Objective):
    """VQA by answer classification on the fused [CLS] of (image, question); `num_answers` must equal the
    source's answer vocabulary (`answer_list`: 31 for the shapes questions, 3129 for VQAv2 in ViLT)."""

    name = "vqa"

    def __init__(self, backbone: FusionBackbone, num_answers: int, optim: OptimConfig | None = None) -> None:
        super().__init__(backbone, optim)
        if num_answers < 2:
            raise ValueError(f"vqa: num_answers must be >= 2, got {num_answers}")
        self.num_answers = num_answers
        self.head = MLPHead(backbone.width, num_answers)  # fused [CLS] [B, D] -> answer logits [B, A]
        self.val_acc = MeanMetric()
        self.val_acc_by_type = nn.ModuleDict({kind: MeanMetric() for kind in ANSWER_TYPES})

    def check_batch(self, batch: dict) -> None:
        missing = [key for key in BATCH_KEYS if key not in batch]
        if missing:
            raise KeyError(
                f"vqa needs batch keys {list(BATCH_KEYS)}; missing {missing}: map the vqa objective to a "
                "source with questions (ShapeQuestionsSource, VQASource) in data.tasks"
            )
        width = batch["answer_scores"].shape[-1]
        if width != self.num_answers:
            raise ValueError(
                f"vqa: the source has {width} candidate answers but the objective's head has "
                f"num_answers={self.num_answers}; set model ... vqa init_args num_answers: {width}"
            )

    def answer_logits(self, batch: dict, features: FeatureCache) -> Tensor:
        """[B, A] logits of every candidate answer for the batch's questions about its images."""
        self.check_batch(batch)
        question = self.backbone.encode_text(batch["question_input_ids"], batch["question_attention_mask"])
        cls = first_token(question.tokens.shape[0], question.tokens.device)
        fused = self.backbone.fuse(
            features.fused_image, question.tokens, question.attention_mask, positions=cls
        )
        return self.head(fused[:, 0])

    def forward_loss(self, batch: dict, features: FeatureCache) -> ObjectiveOutput:
        logits = self.answer_logits(batch, features)
        loss = vqa_loss(logits, batch["answer_scores"])
        accuracy = batch["answer_scores"].gather(1, logits.argmax(dim=1, keepdim=True)).mean()
        return ObjectiveOutput(loss, {"loss": loss, "acc": accuracy.detach()})

    def validation_update(self, batch: dict, features: FeatureCache) -> dict[str, Tensor]:
        logits = self.answer_logits(batch, features)
        scores = batch["answer_scores"].gather(1, logits.argmax(dim=1, keepdim=True))[:, 0]
        real = real_rows(batch)
        if real.any():
            self.val_acc.update(scores[real].mean(), weight=int(real.sum()))
        types = batch.get("answer_types") or ["other"] * len(scores)
        for kind, metric in self.val_acc_by_type.items():
            rows = real & torch.tensor([t == kind for t in types], device=real.device)
            # every rank updates every metric (weight 0 when it has none), so their syncs stay in step
            metric.update(scores[rows].sum() / max(int(rows.sum()), 1), weight=int(rows.sum()))
        return {"loss": vqa_loss(logits, batch["answer_scores"])}

    def validation_scores(self) -> dict[str, float]:
        if not self.val_acc.update_called:
            return {}
        scores = {"val/vqa/acc": self.val_acc.compute().item()}
        for kind, metric in self.val_acc_by_type.items():
            if metric.update_called:
                value = metric.compute().item()
                if value == value:  # no question of this type anywhere: NaN, not logged
                    scores[f"val/vqa/acc_{kind.replace('/', '_')}"] = value
            metric.reset()
        self.val_acc.reset()
        return scores

    @torch.no_grad()
    def predict(self, batch: dict, features: FeatureCache) -> dict[str, Any]:
        """The arg-max answer string of each question (needs the source's `answer_list`), by `question_id`
        (the image id where each image has one question); `vlp predict` writes them to `answers.json`."""
        logits = self.answer_logits(batch, features)
        answers = batch["answer_list"]
        question_ids = batch.get("question_id", batch["image_id"])
        return {"answers": [answers[i] for i in logits.argmax(dim=1).tolist()], "question_id": question_ids}

    @torch.no_grad()
    def validation_images(self, batch: dict, features: FeatureCache) -> dict[str, Tensor]:
        """The first (at most 8) images with the question, the predicted answer and the reference answers."""
        predicted = self.predict(batch, features)["answers"]
        questions = batch.get("questions") or self.backbone.tokenizer.batch_decode(
            batch["question_input_ids"], skip_special_tokens=True
        )
        references = batch.get("answers") or [[""]] * len(predicted)
        texts = [
            [f"{question} {answer}", "/".join(dict.fromkeys(refs))]
            for question, answer, refs in zip(questions, predicted, references, strict=False)
        ]
        return {"val/vqa/answers": annotate_captions(batch["image"], texts, max_images=MAX_IMAGES)}
