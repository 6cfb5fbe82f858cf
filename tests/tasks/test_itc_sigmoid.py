"""ITC with the sigmoid loss (SigLIP): the objective's loss and gradients (embeddings, logit scale, the
backbone's bias) against the naive loss with duplicates as positives, its checks, validation loss and match
probabilities."""

from __future__ import annotations

import pytest
import torch

from vlp.platform.kernels import sigmoid_contrastive_loss_reference
from vlp.platform.metrics import retrieval_recall
from vlp.platform.model.backbone import FeatureCache
from vlp.tasks.itc import ITCObjective
from vlp.tasks.itm import positive_pairs
from vlp.tasks.itm_rerank import rerank_scores


def test_sigmoid_itc_equals_the_naive_loss_with_duplicates_as_positives(make_backbone, batch):
    backbone = make_backbone(init_logit_bias=-10.0)
    objective = ITCObjective(backbone, loss="sigmoid").train()
    assert objective.pair_bias is backbone.logit_bias and backbone.logit_bias.item() == -10.0
    batch = {**batch, "image_id": batch["image_id"].clone()}
    batch["image_id"][1] = batch["image_id"][0]  # a duplicate image
    features = FeatureCache(backbone, batch)
    out = objective.forward_loss(batch, features)
    mask = positive_pairs(batch["image_id"], batch["input_ids"], batch["attention_mask"])
    assert mask.sum() > len(mask)  # the batch has duplicates
    reference = sigmoid_contrastive_loss_reference(
        features.image.embedding, features.text.embedding, backbone.logit_scale(), backbone.logit_bias, mask
    )
    torch.testing.assert_close(out.loss, reference, atol=1e-5, rtol=1e-6)
    assert set(out.logs) == {"loss", "logit_scale", "logit_bias"}
    params = [
        backbone.logit_bias,
        backbone.log_logit_scale,
        backbone.vision_proj.weight,
        backbone.text_proj.weight,
    ]
    for got, want in zip(
        torch.autograd.grad(out.loss, params, retain_graph=True),
        torch.autograd.grad(reference, params),
        strict=True,
    ):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_sigmoid_validation_loss_and_match_probabilities(make_backbone, batch):
    backbone = make_backbone(init_logit_bias=-2.0)
    objective = ITCObjective(backbone, loss="sigmoid").eval()
    with torch.no_grad():
        features = FeatureCache(backbone, batch)
        loss = objective.validation_update(batch, features)["loss"]
        mask = positive_pairs(batch["image_id"], batch["input_ids"], batch["attention_mask"])
        image, text = features.image.embedding, features.text.embedding
        scale = backbone.logit_scale()
        torch.testing.assert_close(
            loss, sigmoid_contrastive_loss_reference(image, text, scale, backbone.logit_bias, mask)
        )
        predicted = objective.predict(batch, features)["match_probability"]
        torch.testing.assert_close(predicted, torch.sigmoid(scale * (image * text).sum(-1) - 2.0))
    with pytest.raises(ValueError, match="sigmoid"):
        ITCObjective(backbone).match_probability(image, text)
    assert "match_probability" not in ITCObjective(backbone).predict(batch, features)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(loss="softmax"), "loss"),
        (dict(loss="sigmoid", alpha=0.4), "alpha"),
        (dict(loss="sigmoid", exchange="gather"), "exchange"),
        (dict(score_against="target"), "score_against"),
        (dict(score_against="momentum"), "momentum"),
        (dict(loss="sigmoid"), "init_logit_bias"),  # the backbone holds no pair bias
    ],
)
def test_bad_arguments_raise(backbone, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ITCObjective(backbone, **kwargs)


def test_retrieval_and_itm_candidates_are_the_same_under_sigmoid_scores():
    """Recall and the ITM re-ranking's top-k candidates read the order of the scores only: the cosine order
    is the order of sigmoid(t cos + b), so ranking by cosine is right for a sigmoid-trained model."""
    gen = torch.Generator().manual_seed(0)
    cosine = torch.rand(6, 12, generator=gen) * 2 - 1
    probabilities = torch.sigmoid(10.0 * cosine - 10.0)
    text_ids, image_ids = torch.arange(12) // 2, torch.arange(6)
    assert retrieval_recall(cosine, text_ids, image_ids) == retrieval_recall(
        probabilities, text_ids, image_ids
    )
    pair_scorer = lambda i, t: (i * 31 + t * 7 % 5).float()  # noqa: E731 - any ITM head
    for got, want in zip(
        rerank_scores(probabilities, 3, pair_scorer), rerank_scores(cosine, 3, pair_scorer), strict=True
    ):
        torch.testing.assert_close(got, want)
