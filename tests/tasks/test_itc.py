import torch
import torch.nn.functional as F

from vlp.platform.metrics import retrieval_recall
from vlp.platform.model.backbone import FeatureCache
from vlp.tasks.itc import ITCObjective
from vlp.tasks.retrieval_split import first_occurrences


def reference_itc(image_emb, text_emb, scale):
    logits = scale * image_emb @ text_emb.T
    target = torch.arange(len(logits))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def test_itc_loss_and_gradients_equal_full_logit_reference(backbone, batch):
    objective = ITCObjective(backbone, chunk_size=3)
    loss = objective.forward_loss(batch, FeatureCache(backbone, batch)).loss
    grads = torch.autograd.grad(
        loss, [backbone.log_logit_scale, backbone.vision_proj.weight, backbone.text_proj.weight]
    )
    features = FeatureCache(backbone, batch)
    expected = reference_itc(features.image.embedding, features.text.embedding, backbone.logit_scale())
    expected_grads = torch.autograd.grad(
        expected, [backbone.log_logit_scale, backbone.vision_proj.weight, backbone.text_proj.weight]
    )
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_retrieval_scores_the_batch_pairs_and_never_the_marked_repeats(backbone, batch):
    """One caption per image (shapes): the pairs of the batch, scored once even when repeated as padding."""
    objective = ITCObjective(backbone)
    features = FeatureCache(backbone, batch)
    objective.validation_update(batch, features)
    repeats = {**batch, "is_padding": torch.ones(len(batch["image_id"]), dtype=torch.bool)}
    objective.validation_update(repeats, FeatureCache(backbone, repeats))  # a DistributedSampler's padding
    scores = objective.validation_scores()
    ids = batch["image_id"]
    want = retrieval_recall(features.image.embedding @ features.text.embedding.T, ids, ids)
    assert scores == {f"val/retrieval/{key}": value for key, value in want.items()}
    assert scores["val/retrieval/t2i_r10"] == 1.0  # only 8 candidates
    assert objective.validation_scores() == {}  # reset after compute


def test_first_occurrences_keeps_first_of_each_id():
    ids = torch.tensor([3, 1, 3, 2, 1])
    values = torch.arange(5)
    kept, kept_ids = first_occurrences(ids, values)
    assert kept_ids.tolist() == [1, 2, 3]
    assert kept.tolist() == [1, 3, 0]
