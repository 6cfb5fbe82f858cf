"""The InfoNCE losses of `vlp.platform.losses`: plain InfoNCE is the kernel's; the distilled loss without
soft targets or queue is plain InfoNCE; `score_against="momentum"` is ALBEF's ITC as LAVIS's
`AlbefPretrain.forward` computes it (the formula transcribed below), in value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlp.platform.kernels import contrastive_loss_reference
from vlp.platform.losses import distilled_infonce_loss, infonce_loss


def _features(b: int = 6, k: int = 10, d: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    unit = lambda n: F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=-1)  # noqa: E731
    return {
        "image": unit(b).requires_grad_(),
        "text": unit(b).requires_grad_(),
        "image_m": unit(b),
        "text_m": unit(b),
        "queue_image": unit(k),
        "queue_text": unit(k),
        "queue_ids": torch.arange(k) % 3,  # ids 0..2 repeat: the batch's own images sit in the queue
        "ids": torch.arange(b),
        "scale": torch.tensor(1 / 0.07, dtype=torch.float64, requires_grad=True),
    }


def _lavis_itc(f: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
    """`AlbefPretrain.forward`'s ITC (lavis/models/albef_models/albef_pretrain.py), queues as [K, D] rows."""
    temp = 1 / f["scale"]
    image_feat_all = torch.cat([f["image_m"].t(), f["queue_image"].t()], dim=1)
    text_feat_all = torch.cat([f["text_m"].t(), f["queue_text"].t()], dim=1)
    with torch.no_grad():
        sim_i2t_m = f["image_m"] @ text_feat_all / temp
        sim_t2i_m = f["text_m"] @ image_feat_all / temp
        sim_targets = torch.zeros(sim_i2t_m.size(), dtype=sim_i2t_m.dtype)
        sim_targets.fill_diagonal_(1)
        sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
        sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
    sim_i2t = f["image"] @ text_feat_all / temp
    sim_t2i = f["text"] @ image_feat_all / temp
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_score_against_momentum_is_lavis_albef_itc(alpha):
    f = _features()
    got = distilled_infonce_loss(
        f["image"], f["text"], f["scale"], f["ids"], alpha=alpha, momentum=(f["image_m"], f["text_m"]),
        queue=(f["queue_image"], f["queue_text"], f["queue_ids"]), score_against="momentum",
    )  # fmt: skip
    want = _lavis_itc(f, alpha)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)  # the loss is reduced in fp32
    leaves = [f["image"], f["text"], f["scale"]]
    for g, w in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(want, leaves), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_online_columns_differ_from_momentum_columns():
    f = _features()
    kwargs = dict(
        alpha=0.4,
        momentum=(f["image_m"], f["text_m"]),
        queue=(f["queue_image"], f["queue_text"], f["queue_ids"]),
    )
    online = distilled_infonce_loss(f["image"], f["text"], f["scale"], f["ids"], **kwargs)
    momentum = distilled_infonce_loss(
        f["image"], f["text"], f["scale"], f["ids"], score_against="momentum", **kwargs
    )
    assert abs(online.item() - momentum.item()) > 1e-3


def test_distilled_without_targets_or_queue_is_plain_infonce():
    f = _features()
    plain = infonce_loss(f["image"].float(), f["text"].float(), f["scale"].float())
    reference = contrastive_loss_reference(f["image"], f["text"], f["scale"]).double()
    distilled = distilled_infonce_loss(f["image"], f["text"], f["scale"], f["ids"])
    torch.testing.assert_close(plain.double(), reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(distilled.double(), reference, rtol=1e-6, atol=1e-6)


def test_bad_arguments_raise():
    f = _features()
    with pytest.raises(ValueError, match="score_against"):
        distilled_infonce_loss(f["image"], f["text"], f["scale"], f["ids"], score_against="queue")
    with pytest.raises(ValueError, match="momentum"):
        distilled_infonce_loss(f["image"], f["text"], f["scale"], f["ids"], score_against="momentum")
