"""Zero-shot class probabilities follow the training loss (softmax over classes for InfoNCE, one sigmoid per
class for SigLIP) while top-1 / top-5, which read the order only, are the same either way."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from vlp.datamodules.shapes import ShapeClassesSource
from vlp.platform.model.backbone import FeatureCache
from vlp.tasks.zeroshot import ZeroShotObjective


@pytest.fixture(scope="module")
def classes() -> ShapeClassesSource:
    return ShapeClassesSource(image_size=32, num_train=16, num_val=12, num_test=8, batch_size=12)


@contextmanager
def trained_bias(backbone, bias):
    """The backbone as a sigmoid-trained one (its pair bias `bias`) or an InfoNCE one (None: no bias)."""
    held = backbone.logit_bias
    backbone.logit_bias = held if bias is not None else None
    try:
        yield
    finally:
        backbone.logit_bias = held


def test_probabilities_follow_the_loss_and_the_ranking_does_not(classes, make_backbone, one_thread):
    backbone = make_backbone(init_logit_bias=-4.0)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in backbone.named_parameters():
            if name != "logit_bias":
                param.add_(torch.randn_like(param) * 0.3)
    dataset = classes.dataset("val")
    batch = classes.collate([dataset[i] for i in range(12)])
    results = {}
    for bias in (None, -4.0):
        objective = ZeroShotObjective(backbone).eval()
        with torch.no_grad(), trained_bias(backbone, bias):
            features = FeatureCache(backbone, batch)
            objective.validation_update(batch, features)
            predicted = objective.predict(batch, features)
            logits = features.image.embedding @ objective.classifier(list(batch["class_names"])).T
            results[bias] = (objective.validation_scores(), predicted, logits)
    (softmax_scores, softmax, logits), (sigmoid_scores, sigmoid, _) = results[None], results[-4.0]
    assert softmax_scores == sigmoid_scores
    assert torch.equal(softmax["predicted_class"], sigmoid["predicted_class"])
    scaled = backbone.logit_scale() * logits
    torch.testing.assert_close(softmax["class_probabilities"], scaled.softmax(dim=1))
    torch.testing.assert_close(sigmoid["class_probabilities"], torch.sigmoid(scaled - 4.0))
    torch.testing.assert_close(softmax["class_probabilities"].sum(1), torch.ones(12))
    assert not torch.allclose(sigmoid["class_probabilities"].sum(1), torch.ones(12))
