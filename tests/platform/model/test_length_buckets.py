"""Running a batch in groups of similar caption length gives the same tokens and gradients at the real
positions as running it padded whole."""

from __future__ import annotations

import pytest
import torch
from padded_passes import assert_equal_to_padded

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


def test_bucketed_passes_equal_the_padded_batch_in_values_and_gradients(
    make_backbone, wide_batch, monkeypatch, one_thread, small_groups
):
    backbone = make_backbone(caption_decoder=True)
    assert len(length_buckets(wide_batch["attention_mask"])) == 3
    assert_equal_to_padded(backbone, wide_batch, monkeypatch, unbucketed)
