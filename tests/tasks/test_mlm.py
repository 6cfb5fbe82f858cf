import torch
import torch.nn.functional as F

from vlp.platform.model.backbone import FeatureCache
from vlp.tasks.mlm import IGNORE_INDEX, MLMObjective, mask_tokens


def test_masking_statistics_follow_bert(backbone, shapes):
    dataset = shapes.dataset("train")
    batch = shapes.collate([dataset[i] for i in range(64)])
    ids, attention = batch["input_ids"], batch["attention_mask"]
    maskable = attention.bool() & ~backbone.special_tokens_mask(ids)
    objective = MLMObjective(backbone)
    generator = torch.Generator().manual_seed(0)
    selected = masked = randomised = kept = eligible = 0
    for _ in range(200):
        out, labels = mask_tokens(ids, maskable, 4, objective.random_token_ids, 0.15, generator)
        chosen = labels != IGNORE_INDEX
        assert not (chosen & ~maskable).any(), "special or padding tokens were selected"
        assert (out[~chosen] == ids[~chosen]).all(), "unselected tokens changed"
        assert (labels[chosen] == ids[chosen]).all()
        eligible += int(maskable.sum())
        selected += int(chosen.sum())
        masked += int((out[chosen] == 4).sum())
        changed = chosen & (out != 4) & (out != ids)
        randomised += int(changed.sum())
        kept += int((chosen & (out == ids)).sum())
        assert not torch.isin(out[changed], backbone.special_token_ids).any()
    assert abs(selected / eligible - 0.15) < 0.005
    assert abs(masked / selected - 0.80) < 0.01
    # a random replacement can draw the original token (1 / #non-special ids); it then counts as kept
    n_random = len(objective.random_token_ids)
    assert abs(randomised / selected - 0.10 * (1 - 1 / n_random)) < 0.01
    assert abs(kept / selected - (0.10 + 0.10 / n_random)) < 0.01


def test_mlm_loss_equals_cross_entropy_on_masked_positions(backbone, batch):
    objective = MLMObjective(backbone)
    features = FeatureCache(backbone, batch)
    torch.manual_seed(3)
    loss = objective.forward_loss(batch, features).loss
    torch.manual_seed(3)
    hidden, labels = objective.masked_hidden(batch, features)
    logits = hidden @ backbone.text.word_embeddings.weight.T + objective.head.bias
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels), atol=1e-5, rtol=1e-5)
    assert labels.numel() > 0 and (labels != IGNORE_INDEX).all()


def test_mlm_validation_masking_is_reproducible(backbone, batch):
    objective = MLMObjective(backbone).eval()
    with torch.no_grad():
        first = objective.validation_update(batch, FeatureCache(backbone, batch))["loss"]
        second = objective.validation_update(batch, FeatureCache(backbone, batch))["loss"]
    assert first == second
    assert 0.0 <= objective.validation_scores()["val/mlm/acc"] <= 1.0
