"""StepPlan: what the multi-task sampler chose for a training step, kept beside the batch, not in it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepPlan:
    """The objective a training step serves and the sampler's probabilities when it was drawn.

    The multi-task data module sets it (`step_plan`) as each training batch reaches the model; the runner
    (`MultiTaskModule`) and the callbacks read it there, so batches hold sample data only.
    """

    objective: str
    probabilities: dict[str, float] = field(default_factory=dict)  # objective -> p, summing to 1
