"""Evaluation under a DistributedSampler: the repeats it pads with are marked and never scored."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DistributedSampler

from vlp.datamodules.multitask import PaddingMarked
from vlp.platform.model.backbone import FeatureCache
from vlp.tasks.grounding import GroundingObjective
from vlp.tasks.itm import ITMObjective
from vlp.tasks.mlm import MLMObjective


def test_padding_marked_reproduces_distributed_sampler_padding_and_marks_only_the_repeats():
    dataset = [{"value": i} for i in range(13)]
    marked = PaddingMarked(dataset, world_size=2)
    assert len(marked) == 14
    for rank in (0, 1):
        plain = list(DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=False))
        ours = list(DistributedSampler(marked, num_replicas=2, rank=rank, shuffle=False))
        assert [marked[i][0]["value"] for i in ours] == [dataset[i]["value"] for i in plain]
        assert [marked[i][1] for i in ours] == [False] * 6 + [rank == 1]
    batch = PaddingMarked.collate_with(lambda items: {"value": torch.tensor([x["value"] for x in items])})(
        [marked[12], marked[13]]
    )
    assert batch["value"].tolist() == [12, 0] and batch["is_padding"].tolist() == [False, True]


def _scores(objectives, batch: dict, backbone) -> dict[str, float]:
    torch.manual_seed(0)
    features = FeatureCache(backbone, batch)
    scores: dict[str, float] = {}
    for objective in objectives:
        objective.validation_update(batch, features)
        scores.update(objective.validation_scores())
    return scores


def _with_repeats(batch: dict, repeats: list[int], marked: bool) -> dict:
    rows = torch.tensor(list(range(len(batch["image_id"]))) + repeats)
    out = {key: value[rows] if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    out["is_padding"] = (
        torch.arange(len(rows)) >= len(batch["image_id"]) if marked else torch.zeros(len(rows)).bool()
    )
    return out


@torch.no_grad()
def test_marked_repeats_leave_itm_mlm_and_grounding_scores_unchanged(backbone, batch, one_thread):
    objectives = [ITMObjective(backbone), MLMObjective(backbone), GroundingObjective(backbone)]
    plain = _scores(objectives, batch, backbone)
    assert {"val/itm/acc", "val/mlm/acc", "val/grounding/acc50", "val/grounding/miou"} <= set(plain)
    marked = _scores(objectives, _with_repeats(batch, [0, 1, 2], marked=True), backbone)
    assert marked == pytest.approx(plain, abs=1e-7)
    counted_twice = _scores(objectives, _with_repeats(batch, [0, 1, 2], marked=False), backbone)
    assert counted_twice["val/grounding/miou"] != pytest.approx(plain["val/grounding/miou"], abs=1e-7)
