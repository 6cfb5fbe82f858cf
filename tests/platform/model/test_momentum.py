"""The momentum model and the feature queue: EMA formula, no gradients, not optimised, ring-buffer wrap."""

from __future__ import annotations

import pytest
import torch

from vlp.platform.model.momentum import FeatureQueue, MomentumConfig, ramped_alpha, soft_cross_entropy
from vlp.platform.optim import OptimConfig, build_optimizer
from vlp.tasks.itc import ITCObjective


def test_momentum_copy_starts_equal_and_follows_the_ema_formula(make_backbone):
    backbone = make_backbone(momentum=MomentumConfig(decay=0.9), caption_decoder=True)
    online = dict(p for p in backbone.named_parameters() if not p[0].startswith("momentum."))
    copy = dict(backbone.momentum.backbone.named_parameters())
    assert online.keys() == copy.keys() and len(copy) > 30
    for name in online:
        assert torch.equal(online[name], copy[name]) and online[name] is not copy[name]
    before = {name: p.clone() for name, p in copy.items()}
    with torch.no_grad():
        for p in online.values():
            p.add_(torch.randn_like(p))
    backbone.momentum.update()
    for name, p in copy.items():
        torch.testing.assert_close(p, 0.9 * before[name] + 0.1 * online[name], atol=1e-6, rtol=1e-6, msg=name)


def test_momentum_parameters_get_no_gradient_and_are_not_optimised(make_backbone, batch):
    backbone = make_backbone(momentum=MomentumConfig())
    objective = ITCObjective(backbone, alpha=0.4, queue_size=16)
    from vlp.platform.model.backbone import FeatureCache

    objective.train()
    objective.forward_loss(batch, FeatureCache(backbone, batch)).loss.backward()
    momentum = {id(p) for p in backbone.momentum.parameters()}
    assert momentum and all(not p.requires_grad and p.grad is None for p in backbone.momentum.parameters())
    optimizer = build_optimizer(objective, OptimConfig(), total_steps=10)["optimizer"]
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not optimised & momentum
    assert backbone.log_logit_scale.grad is not None  # the online model still learns


def test_momentum_heads_are_tracked_and_updated(make_backbone):
    backbone = make_backbone(momentum=MomentumConfig(decay=0.5))
    head = torch.nn.Linear(4, 3)
    copy = backbone.momentum.track("probe", head)
    with torch.no_grad():
        head.weight.add_(2.0)
    before = copy.weight.clone()
    backbone.momentum.update()
    torch.testing.assert_close(copy.weight, 0.5 * before + 0.5 * head.weight)
    assert "momentum.heads.probe.weight" in backbone.state_dict()
    with pytest.raises(ValueError, match="already"):
        backbone.momentum.track("probe", head)


def test_queue_wraps_like_a_ring_buffer():
    queue = FeatureQueue(size=5, dim=2)
    reference: list[int] = []  # plain list of the ids a ring buffer of 5 holds, in slot order
    pointer = 0
    for step, n in enumerate([2, 2, 3, 1, 7]):
        ids = torch.arange(n) + 10 * step
        feats = ids[:, None].float().repeat(1, 2)
        queue.enqueue(feats, -feats, ids)
        for i in ids.tolist()[-5:]:
            if len(reference) < 5:
                reference.append(i)
            else:
                reference[pointer] = i
            pointer = (pointer + 1) % 5
        image, text, held = queue.contents()
        assert held.tolist() == reference, f"after step {step}"
        assert torch.equal(image[:, 0].long(), held) and torch.equal(text, -image)
    assert int(queue.pointer) == pointer and int(queue.filled) == 5


def test_queue_and_pointer_are_in_the_state_dict():
    queue = FeatureQueue(size=4, dim=3)
    queue.enqueue(torch.ones(3, 3), torch.ones(3, 3), torch.arange(3))
    restored = FeatureQueue(size=4, dim=3)
    restored.load_state_dict(queue.state_dict())
    assert int(restored.pointer) == 3 and int(restored.filled) == 3
    assert torch.equal(restored.contents()[2], torch.arange(3))


def test_alpha_ramps_linearly_then_holds():
    assert [ramped_alpha(0.4, 4, s) for s in (0, 2, 4, 100)] == [0.0, 0.2, 0.4, 0.4]
    assert ramped_alpha(0.4, 0, 0) == 0.4


def test_soft_cross_entropy_of_one_hot_targets_is_cross_entropy():
    logits = torch.randn(5, 7)
    labels = torch.tensor([0, 3, 6, 2, 2])
    one_hot = torch.nn.functional.one_hot(labels, 7).float()
    torch.testing.assert_close(
        soft_cross_entropy(logits, one_hot), torch.nn.functional.cross_entropy(logits, labels)
    )


def test_bad_momentum_settings_are_clear_errors(make_backbone):
    with pytest.raises(ValueError, match="decay"):
        MomentumConfig(decay=1.0)
    with pytest.raises(ValueError, match="momentum"):
        ITCObjective(make_backbone(), alpha=0.4)
    with pytest.raises(ValueError, match="queue_size"):
        ITCObjective(make_backbone(), queue_size=8)


def _enqueue_on_two_ranks(local_rank: int, out_dir: str) -> None:
    queue = FeatureQueue(size=6, dim=2)
    for step in range(2):  # each rank enqueues its own 2 rows per step; ids say who and when
        ids = torch.tensor([100 * local_rank + 10 * step, 100 * local_rank + 10 * step + 1])
        queue.enqueue(ids[:, None].float().repeat(1, 2), ids[:, None].float().repeat(1, 2), ids)
    torch.save({name: t for name, t in queue.state_dict().items()}, f"{out_dir}/rank{local_rank}.pt")


def test_queue_holds_the_rows_of_every_rank_in_the_same_order(tmp_path):
    from gloo_ranks import run_on_ranks

    run_on_ranks(_enqueue_on_two_ranks, tmp_path)
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    # step 0: ranks 0 and 1 (0, 1, 100, 101); step 1: 10, 11, 110, 111 wrap over slots 4, 5, 0, 1
    assert states[0]["ids"].tolist() == [110, 111, 100, 101, 10, 11]
    assert int(states[0]["pointer"]) == 2 and int(states[0]["filled"]) == 6
