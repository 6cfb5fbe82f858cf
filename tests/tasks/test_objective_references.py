"""The objectives' math against independent references: plain loops written here, one pair or one caption at a
time, never the objectives' own batching helpers. They pin what the shared-work passes must keep exact: which
pairs ITM scores and with which labels, which negative its validation picks, and that MLM encodes the masked
caption, not the answer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vlp.tasks.itm as itm_module
from vlp.platform.model.backbone import FeatureCache
from vlp.tasks.itm import ITMObjective
from vlp.tasks.mlm import IGNORE_INDEX, MLMObjective


def caption_of(batch: dict, i: int) -> list[int]:
    """The real tokens of caption i as a plain list."""
    return [int(t) for t, m in zip(batch["input_ids"][i], batch["attention_mask"][i], strict=True) if m]


def is_positive(batch: dict, image: int, text: int) -> bool:
    """Image `image` matches text `text`: same image id, or the text is word for word that image's caption."""
    return int(batch["image_id"][image]) == int(batch["image_id"][text]) or caption_of(
        batch, image
    ) == caption_of(batch, text)


def pair_logits(objective: ITMObjective, image_tokens: torch.Tensor, batch: dict, image: int, text: int):
    """The match logits [2] of one (image, text) pair, fused alone (batch of one, caption unpadded)."""
    backbone = objective.backbone
    n = len(caption_of(batch, text))
    ids = batch["input_ids"][text : text + 1, :n]
    mask = batch["attention_mask"][text : text + 1, :n]
    text_tokens = backbone.text(ids, mask)
    features = FeatureCache(backbone, {"image": batch["image"][image : image + 1]}).image
    assert torch.equal(features.tokens[0], image_tokens[image])  # same image pass as the batch's
    return objective.head(backbone.fuse(features, text_tokens, mask)[0, 0])


@pytest.fixture
def duplicated_batch(batch: dict) -> dict:
    """The shared batch with captions 0 = 1 and 2 = 3 = 4 (different images): duplicates to avoid."""
    ids, mask = batch["input_ids"].clone(), batch["attention_mask"].clone()
    for source, copies in ((0, [1]), (2, [3, 4])):
        for j in copies:
            ids[j], mask[j] = ids[source], mask[source]
    return {**batch, "input_ids": ids, "attention_mask": mask}


def record_negatives(monkeypatch) -> list:
    drawn = []
    original = itm_module.sample_hard_negatives

    def recording(similarity, positives, generator=None):
        indices, valid = original(similarity, positives, generator)
        drawn.append((indices.clone(), valid.clone()))
        return indices, valid

    monkeypatch.setattr(itm_module, "sample_hard_negatives", recording)
    return drawn


@pytest.mark.parametrize("seed", range(6))
def test_itm_loss_scores_exactly_the_reference_pairs(
    backbone, duplicated_batch, monkeypatch, one_thread, seed
):
    batch = duplicated_batch
    objective = ITMObjective(backbone)
    drawn = record_negatives(monkeypatch)
    torch.manual_seed(seed)
    features = FeatureCache(backbone, batch)
    loss = objective.forward_loss(batch, features).loss
    (neg_text, text_ok), (neg_image, image_ok) = drawn  # one draw per direction
    b = batch["image"].shape[0]
    pairs = [(i, i, 1) for i in range(b)]
    pairs += [(i, int(neg_text[i]), 0) for i in range(b) if text_ok[i]]
    pairs += [(int(neg_image[t]), t, 0) for t in range(b) if image_ok[t]]
    for image, text, label in pairs:
        assert is_positive(batch, image, text) == bool(label), f"pair ({image}, {text}) labelled {label}"
    logits = torch.stack([pair_logits(objective, features.image.tokens, batch, i, t) for i, t, _ in pairs])
    labels = torch.tensor([label for _, _, label in pairs])
    reference = F.cross_entropy(logits, labels)
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    parameters = [p for p in objective.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    reference_grads = torch.autograd.grad(reference, parameters, allow_unused=True)
    for param_grad, reference_grad in zip(grads, reference_grads, strict=True):
        if reference_grad is None:
            assert param_grad is None or not param_grad.any()
        else:
            torch.testing.assert_close(param_grad, reference_grad, atol=1e-5, rtol=1e-4)


def test_itm_validation_pairs_each_positive_with_its_hardest_true_negative(
    backbone, duplicated_batch, one_thread
):
    batch = duplicated_batch
    objective = ITMObjective(backbone).eval()
    with torch.no_grad():
        features = FeatureCache(backbone, batch)
        loss = objective.validation_update(batch, features)["loss"]
        image, text = features.image.embedding, features.text.embedding
        b = image.shape[0]
        pairs = [(i, i, 1) for i in range(b)]
        for i in range(b):
            candidates = [j for j in range(b) if not is_positive(batch, i, j)]
            if candidates:
                hardest = max(candidates, key=lambda j: float(image[i] @ text[j]))
                pairs.append((i, hardest, 0))
        logits = torch.stack(
            [pair_logits(objective, features.image.tokens, batch, i, t) for i, t, _ in pairs]
        )
    labels = torch.tensor([label for _, _, label in pairs])
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels), atol=1e-5, rtol=1e-5)
    accuracy = objective.val_accuracy
    predicted = logits.argmax(-1)
    assert int(accuracy.tp) == int(((predicted == 1) & (labels == 1)).sum())
    assert int(accuracy.tn) == int(((predicted == 0) & (labels == 0)).sum())
    assert int(accuracy.tp + accuracy.fn) == b and int(accuracy.tn + accuracy.fp) == len(pairs) - b


@pytest.mark.parametrize("validation", [False, True])
def test_mlm_encodes_the_masked_caption_and_scores_only_masked_positions(
    backbone, batch, monkeypatch, one_thread, validation
):
    objective = MLMObjective(backbone)
    masks = []
    original = objective.mask

    def recording(*args, **kwargs):
        masked, labels = original(*args, **kwargs)
        masks.append((masked.clone(), labels.clone()))
        return masked, labels

    monkeypatch.setattr(objective, "mask", recording)
    encoded = []
    backbone.text.register_forward_pre_hook(lambda _m, args: encoded.append(args[0].clone()))
    torch.manual_seed(0)
    features = FeatureCache(backbone, batch)
    with torch.set_grad_enabled(not validation):
        if validation:
            loss = objective.validation_update(batch, features)["loss"]
        else:
            loss = objective.forward_loss(batch, features).loss
    ((masked, labels),) = masks
    selected = labels != IGNORE_INDEX
    assert selected.sum() >= 5
    assert (labels[selected] == batch["input_ids"][selected]).all()
    assert (masked[selected] != batch["input_ids"][selected]).float().mean() > 0.5  # the answer is hidden
    assert len(encoded) == 1 and torch.equal(encoded[0], masked)  # the text tower saw the masked ids only
    # reference: each caption alone, unpadded, CE summed over its masked positions, then the mean
    total, count = 0.0, 0
    with torch.set_grad_enabled(not validation):
        for i in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][i].sum())
            mask = batch["attention_mask"][i : i + 1, :n]
            text = backbone.text(masked[i : i + 1, :n], mask)
            image = FeatureCache(backbone, {"image": batch["image"][i : i + 1]}).image
            fused = backbone.fuse(image, text, mask, merge_text=False)[0]
            for position in range(n):
                if labels[i, position] != IGNORE_INDEX:
                    hidden = objective.head(fused[position])
                    logits = hidden @ backbone.text.word_embeddings.weight.T + objective.head.bias
                    total = total + F.cross_entropy(logits[None], labels[i, position : position + 1])
                    count += 1
    torch.testing.assert_close(loss, total / count, atol=1e-5, rtol=1e-5)
