import pytest
import torch
from step_only import at_step

import vlp.tasks.itm as itm_module
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


def test_hard_negative_warmup_draws_uniformly_first_then_itc_weighted(backbone, batch, monkeypatch):
    objective = ITMObjective(backbone, hard_negative_warmup=4)
    assert [objective.hardness(step) for step in (0, 3, 4, 9)] == [0.0, 0.0, 1.0, 1.0]
    assert ITMObjective(backbone).hardness(0) == 1.0  # ALBEF's draw from the first step
    with pytest.raises(ValueError, match="hard_negative_warmup"):
        ITMObjective(backbone, hard_negative_warmup=-1)
    seen = []
    original = itm_module.sample_hard_negatives
    monkeypatch.setattr(
        itm_module,
        "sample_hard_negatives",
        lambda s, p, g=None: (seen.append(s.clone()), original(s, p, g))[1],
    )
    features = FeatureCache(backbone, batch)
    itc = (features.image.embedding @ features.text.embedding.T * backbone.logit_scale()).detach()
    for step, expected in ((0, torch.zeros_like(itc)), (3, torch.zeros_like(itc)), (4, itc)):
        seen.clear()
        out = at_step(objective, step).forward_loss(batch, features)
        assert out.logs["hardness"].item() == objective.hardness(step)
        torch.testing.assert_close(seen[0], expected)  # negative texts: equal logits = a uniform draw
        torch.testing.assert_close(seen[1], expected.T)  # negative images
    # a share in between draws each row one way or the other
    hard_rows = []
    for _ in range(4):
        seen.clear()
        itm_module.global_match_pairs(batch, features, backbone, hardness=0.5)
        for draw, logits in zip(seen, (itc, itc.T), strict=True):
            hard = (draw == logits).all(dim=1)
            assert (hard | (draw == 0).all(dim=1)).all()
            hard_rows.append(hard)
    assert 0.2 < torch.cat(hard_rows).float().mean().item() < 0.8  # 64 rows, each hard with probability 1/2
