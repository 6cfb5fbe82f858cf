"""A stand-in trainer for tests that call objectives outside a run."""

from __future__ import annotations

from types import SimpleNamespace


class StepOnly:
    """Knows the optimizer step (what `Objective.current_step` reads from the runner's trainer) and that the
    loggers write every step (what `TrainableModule.log_objective` asks); no data module (no step plan)."""

    max_steps = -1
    datamodule = None

    def __init__(self, global_step: int) -> None:
        self.global_step = global_step
        self._logger_connector = SimpleNamespace(should_update_logs=True)


def at_step(module, step: int):
    """`module` with a stand-in trainer at `step` (a MultiTaskModule shares it with its objectives)."""
    module.trainer = StepOnly(step)
    return module
