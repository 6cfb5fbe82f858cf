"""Checkpoint files a resume can trust: atomic writes, and the newest complete checkpoint of an experiment.

Lightning's default writer buffers the checkpoint, then writes it through an fsspec transaction whose
temporary file lives in the system temp folder; when that folder is on another filesystem than the run
(node-local /tmp, shared runs/ on a cluster) the final move is a copy, and a process killed during the
copy leaves a truncated `last.ckpt`. Here the temporary file sits beside the target and replaces it in one
`os.replace`, so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import os
import uuid
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

# Neither "last" nor "hpc_ckpt_" nor ".ckpt" in the name: Lightning's scans for the last / HPC
# checkpoint of a folder must never pick up a file that is still being written.
PARTIAL_SUFFIX = ".partial"


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into a hidden file in the target's folder, fsync, then `os.replace` onto the target."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if "://" in str(path):  # object stores: fsspec's transaction already publishes whole objects
            super().save_checkpoint(checkpoint, path)
            return
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.parent / f".{uuid.uuid4().hex}{PARTIAL_SUFFIX}"
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        directory = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename itself survives a crash of the machine
        finally:
            os.close(directory)


def is_complete_checkpoint(path: Path) -> bool:
    """A torch checkpoint is a zip archive whose directory is written last: a truncated file has none."""
    return path.is_file() and zipfile.is_zipfile(path)


def newest_complete_checkpoint(experiment_dir: Path) -> Path | None:
    """The most recently written complete `*.ckpt` anywhere under `experiment_dir` (every version's
    `checkpoints/` and the `hpc_ckpt_<n>.ckpt` files of Slurm requeues), or None when there is none."""
    if not experiment_dir.is_dir():
        return None
    candidates = [path for path in experiment_dir.rglob("*.ckpt") if is_complete_checkpoint(path)]
    if not candidates:
        return None
    return max(candidates, key=lambda path: (path.stat().st_mtime_ns, str(path)))
