"""TensorBoard scalars of a run folder read back in the order they were written.

A resumed run adds event files to its folder, and TensorBoard reads a folder's files in name order, where a
writer counter of 10 sorts before 9 within one second; ordering each series by wall time undoes that.
"""

from __future__ import annotations

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of `run_dir` -> its (step, value) pairs in the order written."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in sorted(events.Scalars(tag), key=lambda e: e.wall_time)]
        for tag in events.Tags()["scalars"]
    }
