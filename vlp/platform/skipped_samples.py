"""Logs the data module's skipped-sample counts as `data/skipped/<reason>` and prints them at the end.

The data module (any with a `skipped` mapping reason -> count and a `skipped_summary()`) does the counting;
this callback only makes the counts visible, so a run never loses samples silently. Counts are this
rank's (reasons differ between ranks, so there is no fixed set of tags to all-reduce).
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info


class SkippedSamplesMonitor(Callback):
    """Every `log_every_n_steps` training steps and after validation: one scalar per reason seen so far."""

    def _log(self, trainer: Trainer) -> None:
        skipped = getattr(trainer.datamodule, "skipped", None)
        if not skipped:
            return
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"data/skipped/{reason}": float(n) for reason, n in skipped.items()},
                step=trainer.global_step,
            )

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: object) -> None:
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._log(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer)

    def _summarise(self, trainer: Trainer) -> None:
        summary = getattr(trainer.datamodule, "skipped_summary", None)
        if summary is not None:
            self._log(trainer)
            rank_zero_info(f"data: {summary()}")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._summarise(trainer)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._summarise(trainer)
