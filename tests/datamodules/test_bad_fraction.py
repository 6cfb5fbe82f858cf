"""The rule README states: past `max_bad_fraction` of the samples read the run stops, judged once 100
samples were read (annotation entries, usable or not, plus the samples the loaders read); before that no
count of bad entries stops it, so one bad annotation in a 16-image set does not."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest
import torch

from vlp.datamodules.multitask import MIN_SAMPLES_FOR_BAD_FRACTION, MultiTaskDataModule
from vlp.datamodules.shapes import ShapesSource


@pytest.fixture(scope="module")
def tokenizer():
    return ShapesSource(num_train=8, num_val=8, num_test=8, batch_size=4).tokenizer


def annotated(tokenizer, total: int, bad: int) -> SimpleNamespace:
    """A source that read `total` annotation entries of which `bad` were skipped."""
    return SimpleNamespace(
        tokenizer=tokenizer, skipped=Counter(unknown_image=bad) if bad else Counter(), total=total
    )


CASES = [
    # (annotation entries, bad ones among them, max_bad_fraction, stops before training)
    (16, 1, 0.01, False),
    (16, 15, 0.01, False),
    (99, 98, 0.01, False),
    (100, 1, 0.01, False),
    (100, 2, 0.01, True),
    (200, 2, 0.01, False),
    (200, 3, 0.01, True),
    (1000, 100, 0.1, False),
    (1000, 101, 0.1, True),
    (100, 100, 1.0, False),
    (100, 1, 0.0, True),
]


@pytest.mark.parametrize(("total", "bad", "limit", "stops"), CASES)
def test_annotation_skips_are_judged_once_100_samples_were_read(tokenizer, total, bad, limit, stops):
    assert MIN_SAMPLES_FOR_BAD_FRACTION == 100
    source = annotated(tokenizer, total, bad)
    if stops:
        with pytest.raises(
            RuntimeError, match=rf"skipped {bad} of {total} samples read \(unknown_image: {bad}\)"
        ):
            MultiTaskDataModule({"data": source}, max_bad_fraction=limit)
    else:
        MultiTaskDataModule({"data": source}, max_bad_fraction=limit)


@pytest.mark.parametrize(
    ("loaded", "loader_bad", "stops"),
    [(83, 1, False), (84, 0, False), (84, 1, True), (200, 1, False), (283, 2, True)],
)
def test_a_small_set_is_judged_once_the_loaders_reach_100(tokenizer, loaded, loader_bad, stops):
    """16 entries with 1 bad: then the loaders read `loaded` samples (of which `loader_bad` bad)."""
    module = MultiTaskDataModule({"data": annotated(tokenizer, 16, 1)}, max_bad_fraction=0.01)
    batch = {
        "image": torch.zeros(loaded - loader_bad, 1),
        "skipped": {"not_an_image": loader_bad} if loader_bad else {},
    }
    module.on_before_batch_transfer(batch, 0)
    module.sync_skipped()
    assert module.samples_read == 16 + loaded
    if stops:
        with pytest.raises(RuntimeError, match=rf"skipped {1 + loader_bad} of {16 + loaded} samples read"):
            module.check_bad_fraction()
    else:
        module.check_bad_fraction()
