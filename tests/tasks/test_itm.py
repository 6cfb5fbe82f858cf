import torch

from vlp.platform.model.backbone import FeatureCache
from vlp.tasks.itm import ITMObjective, positive_pairs, sample_hard_negatives


def test_positive_pairs_cover_same_image_and_duplicate_captions():
    image_ids = torch.tensor([0, 1, 2, 0])
    input_ids = torch.tensor([[2, 5, 3, 0], [2, 6, 3, 0], [2, 5, 3, 0], [2, 7, 8, 3]])
    mask = (input_ids != 0).long()
    pos = positive_pairs(image_ids, input_ids, mask)
    assert pos.diagonal().all()
    assert pos[0, 2] and pos[2, 0]  # identical caption on different images
    assert pos[0, 3] and pos[3, 0]  # same image id
    assert not pos[0, 1] and not pos[1, 2]


def test_hard_negatives_never_pick_a_positive_even_with_duplicates():
    generator = torch.Generator().manual_seed(0)
    b = 6
    positives = torch.eye(b, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = True  # duplicate captions
    similarity = torch.randn(b, b, generator=generator) * 5
    similarity[0, 1] = similarity[1, 0] = 100.0  # the duplicate is by far the most similar
    for _ in range(500):
        index, valid = sample_hard_negatives(similarity, positives, generator)
        assert valid.all()
        assert not positives[torch.arange(b), index].any()


def test_hard_negatives_follow_the_softmaxed_similarity():
    generator = torch.Generator().manual_seed(1)
    similarity = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    positives = torch.eye(3, dtype=torch.bool)
    picks = torch.stack([sample_hard_negatives(similarity, positives, generator)[0][0] for _ in range(4000)])
    share_of_hard = (picks == 1).float().mean().item()
    expected = torch.softmax(torch.tensor([2.0, 0.0]), 0)[0].item()  # 0.881
    assert abs(share_of_hard - expected) < 0.02


def test_rows_without_any_negative_are_marked_invalid():
    positives = torch.ones(3, 3, dtype=torch.bool)  # one caption repeated three times
    index, valid = sample_hard_negatives(torch.zeros(3, 3), positives)
    assert not valid.any()


def test_itm_step_scores_b_positives_and_2b_negatives(backbone, batch):
    objective = ITMObjective(backbone)
    seen = []
    objective.head.register_forward_hook(lambda _m, _i, out: seen.append(out.shape[0]))
    out = objective.forward_loss(batch, FeatureCache(backbone, batch))
    assert seen == [3 * 8]
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert (
        objective.head.weight.grad is not None
        and backbone.fusion.layers[0].cross_attn.query.weight.grad is not None
    )


def test_itm_validation_is_balanced(backbone, batch):
    objective = ITMObjective(backbone)
    objective.validation_update(batch, FeatureCache(backbone, batch))
    acc = objective.val_accuracy
    assert int(acc.tp + acc.fn) == 8 and int(acc.tn + acc.fp) == 8  # 8 positives + 8 hardest negatives
    assert 0.0 <= objective.validation_scores()["val/itm/acc"] <= 1.0
