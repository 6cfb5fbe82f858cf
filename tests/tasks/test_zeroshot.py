"""Zero-shot classification equals a direct computation: prompt embeddings one at a time, averaged per class,
then the top-1 / top-5 of every image by a plain loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlp.datamodules.shapes import CLASS_NAMES, ShapeClassesSource
from vlp.platform.model.backbone import FeatureCache
from vlp.tasks.zeroshot import ZeroShotObjective


@pytest.fixture(scope="module")
def classes() -> ShapeClassesSource:
    return ShapeClassesSource(image_size=32, num_train=16, num_val=24, num_test=8, batch_size=12)


def test_labels_name_the_drawn_object(classes):
    dataset = classes.dataset("val")
    for index in range(len(dataset)):
        obj = dataset.scene(index).objects[0]
        assert CLASS_NAMES[dataset[index]["label"]] == f"{obj.colour} {obj.shape}"
        assert len(dataset.scene(index).objects) == 1


def test_zero_shot_scores_equal_a_direct_computation(classes, make_backbone, one_thread):
    backbone = make_backbone()
    torch.manual_seed(3)
    with torch.no_grad():  # spread the untrained towers so the classes are told apart at all
        for param in backbone.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    objective = ZeroShotObjective(backbone, templates=["a {}", "there is a {}"]).eval()
    dataset = classes.dataset("val")
    batches = [classes.collate([dataset[i] for i in range(s, s + 12)]) for s in (0, 12)]
    with torch.no_grad():
        for batch in batches:
            objective.validation_update(batch, FeatureCache(backbone, batch))
        scores = objective.validation_scores()
        weights = []
        for name in CLASS_NAMES:
            prompts = [
                F.normalize(embed(backbone, template.format(name)), dim=-1)
                for template in ("a {}", "there is a {}")
            ]
            weights.append(F.normalize(torch.stack(prompts).mean(0), dim=-1))
        top1 = top5 = 0
        for batch in batches:
            for image, label in zip(
                backbone.encode_image(batch["image"]).embedding, batch["label"], strict=True
            ):
                ranked = sorted(range(len(CLASS_NAMES)), key=lambda c: -float(image @ weights[c]))
                top1 += ranked[0] == int(label)
                top5 += int(label) in ranked[:5]
    assert scores["val/zeroshot/top1"] == pytest.approx(top1 / 24, abs=1e-6)
    assert scores["val/zeroshot/top5"] == pytest.approx(top5 / 24, abs=1e-6)


def embed(backbone, text: str) -> torch.Tensor:
    encoded = backbone.tokenizer([text], return_tensors="pt")
    return backbone.encode_text(encoded["input_ids"], encoded["attention_mask"]).embedding[0]


def test_zero_shot_is_evaluation_only_and_checks_its_inputs(classes, backbone, batch):
    objective = ZeroShotObjective(backbone)
    with pytest.raises(RuntimeError, match="evaluation protocol"):
        objective.forward_loss(batch, FeatureCache(backbone, batch))
    with pytest.raises(KeyError, match="labelled"):
        objective.validation_update(batch, FeatureCache(backbone, batch))
    with pytest.raises(ValueError, match="exactly one"):
        ZeroShotObjective(backbone, templates=["no slot"])
