"""The whole evaluation split that retrieval ranks, kept batch by batch and synced over ranks.

Images and texts are kept apart because an image may have several captions (COCO: about five); every
caption is a query of its own and each is right for its image only (ALBEF / BLIP `itm_eval`). Rows the
distributed sampler repeated (`is_padding`) are kept with their flag, so every rank updates every batch,
and dropped after the sync, so each sample counts once whatever the number of ranks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn
from torchmetrics.aggregation import CatMetric

from vlp.platform.model.backbone import FeatureCache, TextFeatures
from vlp.tasks.base import batch_size_of, real_rows


class RetrievalTexts(NamedTuple):
    """The texts an evaluation batch puts up for retrieval: every caption of its images when the source
    gives them (`reference_*`), else its one caption per row."""

    features: TextFeatures  # tokens [R, L, Dt], attention_mask [R, L], embedding [R, E]
    image_id: Tensor  # [R] the id of each text's image
    real: Tensor  # [R] bool: the text's row is not an `is_padding` repeat


def retrieval_texts(batch: dict, features: FeatureCache) -> RetrievalTexts:
    device = batch["image"].device
    rows = batch.get("reference_row")
    rows = torch.arange(batch_size_of(batch), device=device) if rows is None else rows.to(device)
    return RetrievalTexts(features.references, batch["image_id"][rows], real_rows(batch)[rows])


def first_occurrences(ids: Tensor, *values: Tensor) -> tuple[Tensor, ...]:
    """Keep the first row of each id from values [N, ...] (a source may give one image several rows, e.g.
    one per referring box); returns (*values, ids), sorted by id."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(len(ids), device=ids.device)
    first = torch.full_like(unique, len(ids)).scatter_reduce(0, inverse, positions, "amin")
    return (*(v[first] for v in values), ids[first])


class SplitRows(nn.Module):
    """Per-row tensors (`keys`, each [N, ...]) with each row's `image_id` and `real` flag, gathered over the
    split and over ranks. Ids are held in float64 (exact to 2^53, whatever the model's precision)."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.values = nn.ModuleDict({key: CatMetric(nan_strategy="disable") for key in keys})
        self.marks = nn.ModuleDict(
            {key: CatMetric(nan_strategy="disable").set_dtype(torch.float64) for key in ("image_id", "real")}
        )

    @property
    def update_called(self) -> bool:
        return self.marks["image_id"].update_called

    def update(self, image_id: Tensor, real: Tensor, **values: Tensor) -> None:
        self.marks["image_id"].update(image_id.double())
        self.marks["real"].update(real.double())
        for key, value in values.items():
            self.values[key].update(value)

    def pop(self) -> dict[str, Tensor]:
        """The real rows of the whole split, `image_id` as long; resets for the next epoch."""
        keep = self.marks["real"].compute().bool()
        rows = {key: metric.compute()[keep] for key, metric in self.values.items()}
        rows["image_id"] = self.marks["image_id"].compute()[keep].long()
        for metric in (*self.values.values(), *self.marks.values()):
            metric.reset()
        return rows


def unique_images(rows: dict[str, Tensor]) -> dict[str, Tensor]:
    """`SplitRows.pop()` of the image side with each image once (its first row)."""
    keys = [key for key in rows if key != "image_id"]
    *values, ids = first_occurrences(rows["image_id"], *(rows[key] for key in keys))
    return {**dict(zip(keys, values, strict=True)), "image_id": ids}
