"""Logs the data module's skipped-sample counts as `data/skipped/<reason>`, stops the run past its limit, and
prints the counts at the end.

The data module (any with `sync_skipped()`, a `skipped` mapping reason -> count, `check_bad_fraction()` and
`skipped_summary()`) does the counting; this callback picks the moments, the same on every rank, at which
the counts are summed over ranks (reasons differ between ranks, so the data module gathers them), logged
and checked: so the limit and the summary are the whole run's, and every rank stops together.
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info


class SkippedSamplesMonitor(Callback):
    """Every `log_every_n_steps` training steps, after validation and at the end: one scalar per reason
    seen so far, then the `max_bad_fraction` check."""

    def _sync(self, trainer: Trainer) -> bool:
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "sync_skipped"):
            return False
        datamodule.sync_skipped()
        if datamodule.skipped:
            for logger in trainer.loggers:
                logger.log_metrics(
                    {f"data/skipped/{reason}": float(n) for reason, n in datamodule.skipped.items()},
                    step=trainer.global_step,
                )
        datamodule.check_bad_fraction()
        return True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: object) -> None:
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0:
            self._sync(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sync(trainer)

    def _summarise(self, trainer: Trainer) -> None:
        if self._sync(trainer):
            rank_zero_info(f"data: {trainer.datamodule.skipped_summary()}")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._summarise(trainer)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._summarise(trainer)
