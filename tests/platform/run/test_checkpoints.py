"""Atomic checkpoint writes and the search for the newest complete checkpoint."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from vlp.platform.run.checkpoints import (
    AtomicCheckpointIO,
    is_complete_checkpoint,
    newest_complete_checkpoint,
)

KILLED_MID_WRITE = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from vlp.platform.run.checkpoints import AtomicCheckpointIO

    # killed once every byte is out but before the file is published: the widest window there is
    os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
    AtomicCheckpointIO().save_checkpoint({"weights": torch.full((1 << 20,), 2.0)}, sys.argv[1])
    """
)


def test_a_process_killed_while_saving_leaves_the_previous_checkpoint_intact(tmp_path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"weights": torch.ones(4), "step": 3}, target)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[3])}
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(target)], env=env, timeout=120)
    assert killed.returncode == -9
    partial = [path for path in target.parent.iterdir() if path != target]
    assert len(partial) == 1 and partial[0].stat().st_size > 4 << 20  # 4 MiB written
    assert not partial[0].name.endswith(".ckpt") and "last" not in partial[0].name
    loaded = torch.load(target, weights_only=True)
    assert loaded["step"] == 3 and torch.equal(loaded["weights"], torch.ones(4))
    assert newest_complete_checkpoint(tmp_path) == target


def test_save_replaces_the_target_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "hpc_ckpt_1.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, target)
    io.save_checkpoint({"step": 2}, target)
    assert [path.name for path in tmp_path.iterdir()] == ["hpc_ckpt_1.ckpt"]
    assert io.load_checkpoint(target, weights_only=True)["step"] == 2


def test_newest_complete_checkpoint_skips_truncated_files_and_searches_every_version(tmp_path):
    older = tmp_path / "version_0" / "checkpoints" / "step=6.ckpt"
    newer = tmp_path / "version_1" / "hpc_ckpt_1.ckpt"
    newest = tmp_path / "version_1" / "checkpoints" / "last.ckpt"
    for step, path in enumerate([older, newer, newest]):
        AtomicCheckpointIO().save_checkpoint({"step": step, "weights": torch.zeros(1000)}, path)
        os.utime(path, ns=(step * 10**9, step * 10**9))
    assert newest_complete_checkpoint(tmp_path) == newest
    newest.write_bytes(newest.read_bytes()[:-100])  # the tail (zip directory) never reached the disk
    assert not is_complete_checkpoint(newest)
    assert newest_complete_checkpoint(tmp_path) == newer
    assert newest_complete_checkpoint(tmp_path / "missing") is None
