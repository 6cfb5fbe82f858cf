"""Running a batch in groups of similar caption length gives the same tokens and gradients at the real
positions as running it padded whole."""

from __future__ import annotations

import pytest
import torch

import vlp.platform.model.length_buckets as buckets_module
from vlp.platform.model.length_buckets import length_buckets


@pytest.fixture
def wide_batch(shapes) -> dict:
    dataset = shapes.dataset("train")
    return shapes.collate([dataset[i] for i in range(48)])


def unbucketed(monkeypatch) -> None:
    monkeypatch.setattr(buckets_module, "length_buckets", lambda mask, *a, **k: [(None, mask.shape[1])])


@pytest.fixture
def small_groups(monkeypatch) -> None:
    """Groups of 16 rows, so a 48-row batch runs in three (the default needs 128 rows for two)."""
    monkeypatch.setattr(buckets_module, "MIN_ROWS", 16)


def test_groups_cover_every_row_once_in_length_order(wide_batch):
    mask = wide_batch["attention_mask"]
    assert length_buckets(mask) == [(None, mask.shape[1])]  # the default: at least 64 rows a group
    assert len(length_buckets(mask.repeat(3, 1))) == 2  # 144 rows
    groups = length_buckets(mask, min_rows=16)
    assert len(groups) == 3  # 48 rows, at least 16 per group
    rows = torch.cat([r for r, _ in groups])
    assert sorted(rows.tolist()) == list(range(48))
    lengths = mask.sum(1)
    for r, length in groups:
        assert length == int(lengths[r].max())
    assert [length for _, length in groups] == sorted(length for _, length in groups)
    assert length_buckets(mask[:20], min_rows=16) == [(None, mask.shape[1])]  # too few rows to split


def passes(backbone, batch):
    """Text tokens, fused tokens, fused tokens at some positions and decoder states of the batch."""
    image = backbone.with_fusion_keys(backbone.encode_image(batch["image"]))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    text = backbone.encode_text(ids, mask)
    positions = torch.stack([torch.zeros_like(mask[:, 0]), mask.sum(1) - 1], dim=1)  # [CLS] and [SEP]
    return {
        "text": text.tokens,
        "embedding": text.embedding,
        "fused": backbone.fuse(image, text.tokens, mask),
        "positions": backbone.fuse(image, text.tokens, mask, positions=positions),
        "decoded": backbone.decode(image, ids, mask),
    }


def test_bucketed_passes_equal_the_padded_batch_in_values_and_gradients(
    make_backbone, wide_batch, monkeypatch, one_thread, small_groups
):
    backbone = make_backbone(caption_decoder=True)
    assert len(length_buckets(wide_batch["attention_mask"])) == 3
    real = wide_batch["attention_mask"].bool()[..., None]
    bucketed = passes(backbone, wide_batch)
    with monkeypatch.context() as patch:
        unbucketed(patch)
        whole = passes(backbone, wide_batch)
    for key, value in whole.items():
        got = bucketed[key]
        if key in ("text", "fused", "decoded"):
            got, value = got * real, value * real
        torch.testing.assert_close(got, value, atol=1e-5, rtol=1e-5, msg=key)

    def gradients(outputs):
        loss = sum(
            (out * real).sum() if out.dim() == 3 and out.shape[1] == real.shape[1] else out.sum()
            for out in outputs.values()
        )
        return torch.autograd.grad(
            loss, [p for p in backbone.parameters() if p.requires_grad], allow_unused=True
        )

    for got, want in zip(gradients(bucketed), gradients(whole), strict=True):
        if want is None:
            assert got is None or not got.any()
        else:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
