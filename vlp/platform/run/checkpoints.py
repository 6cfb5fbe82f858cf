"""Checkpoint files a resume can trust: atomic writes, and the newest complete checkpoint of an experiment.

Lightning's default writer buffers the checkpoint, then writes it through an fsspec transaction whose
temporary file lives in the system temp folder; when that folder is on another filesystem than the run
(node-local /tmp, shared runs/ on a cluster) the final move is a copy, and a process killed during the
copy leaves a truncated `last.ckpt`. Here the temporary file sits beside the target and replaces it in one
`os.replace`, so a reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import time
import uuid
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info

# Neither "last" nor "hpc_ckpt_" nor ".ckpt" in the name: Lightning's scans for the last / HPC
# checkpoint of a folder must never pick up a file that is still being written. The name holds the
# writer's host and process id, so a later run can tell a killed writer's leftovers from a live save.
PARTIAL_SUFFIX = ".partial"
PARTIAL_NAME = re.compile(r"^\.(?:(?P<host>[A-Za-z0-9_.-]+?)-(?P<pid>\d+)-)?[0-9a-f]{32}\.partial$")
# a partial not written to for this long is stale whoever wrote it (a writer on another node)
STALE_PARTIAL_S = 600.0


def partial_path(target: Path) -> Path:
    """The hidden file a save of `target` writes first: `.<host>-<pid>-<uuid>.partial` beside it."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"
    return target.parent / f".{host}-{os.getpid()}-{uuid.uuid4().hex}{PARTIAL_SUFFIX}"


def is_stale_partial(path: Path, now: float | None = None) -> bool:
    """Whether `path` is a partial checkpoint no live process is writing: one written on this host by a
    process that is gone, or one untouched for `STALE_PARTIAL_S` (another host's, or an older name)."""
    match = PARTIAL_NAME.match(path.name)
    if match is None or not path.is_file():
        return False
    this_host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())
    if match["pid"] is not None and match["host"] == this_host:
        pid = int(match["pid"])
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, someone else's
    return (now if now is not None else time.time()) - path.stat().st_mtime > STALE_PARTIAL_S


def remove_stale_partials(folders: Iterable[Path], recursive: Iterable[Path] = ()) -> list[Path]:
    """Delete the stale partial checkpoints (see `is_stale_partial`) directly in `folders` and anywhere
    under `recursive`; returns what was removed. Killed saves leave them behind, never read again."""
    candidates = [
        path for folder in folders if Path(folder).is_dir() for path in Path(folder).glob(".*.partial")
    ]
    for folder in recursive:
        if Path(folder).is_dir():
            candidates += Path(folder).rglob(".*.partial")
    removed = []
    for path in sorted(set(candidates)):
        if is_stale_partial(path):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class StalePartialsCleanup(Callback):
    """At the start of a fit, rank 0 removes the stale partial checkpoints of the experiment (every
    version folder under the logger's `<save_dir>/<name>/`, and the trainer's root folder, where Slurm
    requeue checkpoints go) and says how many bytes it freed."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.global_rank != 0:
            return
        experiment = getattr(trainer.logger, "root_dir", None) if trainer.logger is not None else None
        removed = remove_stale_partials(
            [Path(trainer.default_root_dir)], [Path(experiment)] if experiment else []
        )
        if removed:
            rank_zero_info(
                f"removed {len(removed)} stale partial checkpoint(s) left by killed saves: {removed}"
            )


def no_space_error(error: BaseException) -> OSError | None:
    """The ENOSPC error behind `error`, if any: torch.save reports a full disk as a RuntimeError
    ("[enforce fail at inline_container.cc...] unexpected pos") whose cause or text holds it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return error
        if "No space left on device" in str(error):
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        error = error.__cause__ or error.__context__
    return None


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
        partial = partial_path(target)
        try:
            with open(partial, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(partial, target)
        except (OSError, RuntimeError) as error:
            full = no_space_error(error)
            if full is None:
                raise
            raise OSError(
                errno.ENOSPC,
                f"No space left on device while saving the checkpoint {target} (the previous checkpoint is "
                f"intact; free space in {target.parent} and resume with --ckpt_path last)",
            ) from error
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
