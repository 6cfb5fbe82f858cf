"""`vlp predict` output: the generated captions as `predictions.json` (image id -> caption) and the VQA
answers as `answers.json` (question id -> answer) in the run folder."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn

from vlp.platform.distributed.collectives import all_gather_objects


class PredictionWriter(BasePredictionWriter):
    """Collects `prediction[key]` per `prediction[id_key]` from every predict batch of every rank and
    writes them to `<trainer.log_dir>/<filename>` at the end of predict (rank zero), printing its path.

    Batches are collected as they come (not from the trainer's stored predictions), so it also works with
    `return_predictions=False`. Predictions without `key` (an objective with nothing to caption) are skipped.
    """

    def __init__(
        self, filename: str = "predictions.json", key: str = "caption", id_key: str = "image_id"
    ) -> None:
        super().__init__(write_interval="batch")
        if not filename.endswith(".json"):
            raise ValueError(f"filename must end in .json, got {filename!r}")
        self.filename = filename
        self.key, self.id_key = key, id_key
        self._rows: dict[int | str, Any] = {}

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows = {}

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not isinstance(prediction, dict) or self.key not in prediction:
            return
        ids = prediction[self.id_key]
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        values = prediction[self.key]
        if len(values) != len(ids):
            raise ValueError(
                f"prediction[{self.key!r}] has {len(values)} entries for {len(ids)} {self.id_key}s"
            )
        self._rows.update(zip(ids, values, strict=True))

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rows = {key: value for shard in all_gather_objects(self._rows) for key, value in shard.items()}
        if not trainer.is_global_zero:
            return
        if not rows:
            rank_zero_warn(f"PredictionWriter: no prediction had a {self.key!r} entry; nothing written")
            return
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.filename
        ordered = {str(key): rows[key] for key in sorted(rows, key=_sort_key)}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(ordered, indent=2) + "\n")
        tmp.replace(path)
        print(f"{self.filename}: {path} ({len(ordered)} {self.key}s)", flush=True)


def _sort_key(key: int | str) -> tuple[int, int | str]:
    return (0, key) if isinstance(key, int) else (1, str(key))
