"""The VQA objective against plain references: the soft BCE loss, gradients into head and backbone, the
validation accuracy (padding rows out, per answer type), answer strings, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from vlp.datamodules.shapes_questions import ANSWERS, ShapeQuestionsSource
from vlp.platform.model.backbone import FeatureCache
from vlp.tasks.vqa import VQAObjective, vqa_loss


@pytest.fixture(scope="module")
def questions() -> ShapeQuestionsSource:
    return ShapeQuestionsSource(image_size=32, num_train=32, num_val=16, num_test=8, batch_size=8)


@pytest.fixture
def vqa(make_backbone) -> VQAObjective:
    torch.manual_seed(0)
    return VQAObjective(make_backbone(), num_answers=len(ANSWERS))


def batch_of(source: ShapeQuestionsSource, split: str, indices: range) -> dict:
    dataset = source.dataset(split)
    return source.collate([dataset[i] for i in indices])


def test_loss_is_soft_bce_summed_over_answers_and_averaged_over_questions():
    torch.manual_seed(1)
    logits, targets = torch.randn(3, 5), torch.rand(3, 5)
    by_hand = 0.0
    for row in range(3):
        for answer in range(5):
            p = 1 / (1 + math.exp(-logits[row, answer].item()))
            t = targets[row, answer].item()
            by_hand -= t * math.log(p) + (1 - t) * math.log(1 - p)
    assert vqa_loss(logits, targets).item() == pytest.approx(by_hand / 3, rel=1e-5)


def test_forward_loss_trains_head_and_backbone(vqa, questions):
    batch = batch_of(questions, "train", range(8))
    out = vqa.forward_loss(batch, FeatureCache(vqa.backbone, batch))
    logits = vqa.answer_logits(batch, FeatureCache(vqa.backbone, batch))
    assert logits.shape == (8, len(ANSWERS))
    torch.testing.assert_close(out.loss, vqa_loss(logits, batch["answer_scores"]))
    out.loss.backward()
    for part in ("head", "backbone.vision", "backbone.text", "backbone.fusion"):
        grads = [p.grad for n, p in vqa.named_parameters() if n.startswith(part) and p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), part


def test_validation_accuracy_counts_real_rows_once_and_by_answer_type(vqa, questions):
    vqa.eval()
    batches = [batch_of(questions, "val", range(0, 8)), batch_of(questions, "val", range(8, 16))]
    batches[1]["is_padding"] = torch.tensor([False] * 5 + [True] * 3)  # the last 3 rows repeat others
    hits, by_type = [], {}
    with torch.no_grad():
        for batch in batches:
            vqa.validation_update(batch, FeatureCache(vqa.backbone, batch))
            logits = vqa.answer_logits(batch, FeatureCache(vqa.backbone, batch))
            padding = batch.get("is_padding", torch.zeros(8, dtype=torch.bool))
            for row in range(8):
                if padding[row]:
                    continue
                predicted = ANSWERS[int(logits[row].argmax())]
                hit = float(predicted == batch["answers"][row][0])
                hits.append(hit)
                by_type.setdefault(batch["answer_types"][row], []).append(hit)
    scores = vqa.validation_scores()
    assert scores["val/vqa/acc"] == pytest.approx(sum(hits) / len(hits))
    assert len(hits) == 13
    for kind, values in by_type.items():
        assert scores[f"val/vqa/acc_{kind.replace('/', '_')}"] == pytest.approx(sum(values) / len(values))
    assert vqa.validation_scores() == {}  # reset after reading


def test_predict_gives_answer_strings(vqa, questions):
    batch = batch_of(questions, "val", range(4))
    with torch.no_grad():
        answers = vqa.predict(batch, FeatureCache(vqa.backbone, batch))["answers"]
        logits = vqa.answer_logits(batch, FeatureCache(vqa.backbone, batch))
    assert answers == [ANSWERS[i] for i in logits.argmax(dim=1).tolist()]
    images = vqa.validation_images(batch, FeatureCache(vqa.backbone, batch))["val/vqa/answers"]
    assert images.dtype == torch.uint8 and images.shape[:2] == (4, 3)


def test_bad_batches_and_settings_are_clear_errors(make_backbone, questions):
    batch = batch_of(questions, "train", range(4))
    wrong = VQAObjective(make_backbone(), num_answers=10)
    with pytest.raises(ValueError, match=f"source has {len(ANSWERS)} candidate answers.*num_answers=10"):
        wrong.forward_loss(batch, FeatureCache(wrong.backbone, batch))
    without = {k: v for k, v in batch.items() if k != "answer_scores"}
    with pytest.raises(KeyError, match="answer_scores"):
        wrong.forward_loss(without, FeatureCache(wrong.backbone, without))
    with pytest.raises(ValueError, match="num_answers must be >= 2"):
        VQAObjective(make_backbone(), num_answers=1)
