"""Every pass that runs a batch other than padded whole (length groups, packed tokens), and the check that
such a pass equals the padded batch in values at the real positions and in gradients."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

PER_POSITION = ("text", "fused", "attended", "decoded")  # outputs [B, L, D]: compared at real positions


def passes(backbone, batch: dict) -> dict[str, torch.Tensor]:
    """Text tower, fused tokens (all, some positions, ITM's self-attended captions with gathered keys and
    values), the captions' first fusion self-attention and the decoder states of `batch`."""
    image = backbone.with_fusion_keys(backbone.encode_image(batch["image"]))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    text = backbone.encode_text(ids, mask)
    positions = torch.stack([torch.zeros_like(mask[:, 0]), mask.sum(1) - 1, mask.sum(1) // 2], dim=1)
    attended = backbone.first_self_attention(text.tokens, mask)
    rows = torch.arange(len(ids)).roll(1)
    cls = torch.zeros(len(ids), 1, dtype=torch.long)
    return {
        "text": text.tokens,
        "embedding": text.embedding,
        "fused": backbone.fuse(image, text.tokens, mask),
        "positions": backbone.fuse(image, text.tokens, mask, positions=positions),
        "attended": attended,
        "pairs": backbone.fuse(image.take(rows), attended, mask, positions=cls, self_attended=True),
        "decoded": backbone.decode(image, ids, mask),
    }


def assert_equal_to_padded(
    backbone,
    batch: dict,
    monkeypatch: pytest.MonkeyPatch,
    padded: Callable[[pytest.MonkeyPatch], None],
) -> dict[str, torch.Tensor]:
    """`passes` as the code runs them equal `passes` under `padded` (a patch that makes every pass run the
    padded batch whole): values at the real positions, and the gradient of every parameter under a random
    weighting of the outputs. Both run in float64 (`backbone` is converted in place), so the check is tight
    (1e-10): in float32 the two paths sum in other orders and differ by rounding that grows with the rows
    summed (3e-5 in a weight gradient on one CPU), which would hide a real error of that size. Returns the
    outputs of the code as it runs."""
    backbone.double()
    batch = {**batch, "image": batch["image"].double()}
    real = batch["attention_mask"].bool()[..., None]
    ours = passes(backbone, batch)
    with monkeypatch.context() as patch:
        padded(patch)
        whole = passes(backbone, batch)
    for key, value in whole.items():
        got = ours[key]
        if key in PER_POSITION:
            got, value = got * real, value * real
        torch.testing.assert_close(got, value, atol=1e-10, rtol=1e-10, msg=key)

    def gradients(outputs: dict[str, torch.Tensor]) -> tuple:
        weights = torch.Generator().manual_seed(0)
        loss = sum(
            ((out * real) if key in PER_POSITION else out)
            .mul(torch.randn(out.shape, generator=weights))
            .sum()
            for key, out in outputs.items()
        )
        return torch.autograd.grad(loss, list(backbone.parameters()), allow_unused=True)

    for got, want in zip(gradients(ours), gradients(whole), strict=True):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    return ours
