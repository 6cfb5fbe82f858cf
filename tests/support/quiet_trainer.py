"""A CPU Trainer for tests that fit a module: no logger, checkpoints, progress bar or summary."""

from typing import Any

from lightning.pytorch import Trainer


def quiet_trainer(**kwargs: Any) -> Trainer:
    """A CPU trainer with no logger, checkpoints, bar or summary unless `kwargs` say otherwise."""
    defaults = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    return Trainer(**{**defaults, **kwargs})
