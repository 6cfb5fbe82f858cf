"""Atomic checkpoint writes and the search for the newest complete checkpoint."""

import errno
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from vlp.platform.run.checkpoints import (
    STALE_PARTIAL_S,
    AtomicCheckpointIO,
    is_complete_checkpoint,
    is_stale_partial,
    newest_complete_checkpoint,
    remove_stale_partials,
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


def test_the_partial_of_a_killed_save_is_stale_at_once(tmp_path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[3])}
    subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(target)], env=env, timeout=120)
    [partial] = list(target.parent.iterdir())
    assert is_stale_partial(partial)
    assert remove_stale_partials([], [tmp_path]) == [partial] and not partial.exists()


@pytest.fixture(scope="module")
def pids() -> dict[str, int]:
    """A process id that has ended, a live one (this test's parent) and this process's own."""
    done = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True)
    return {"dead": int(done.stdout), "alive": os.getppid(), "mine": os.getpid()}


HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())
UUID = "0123456789abcdef0123456789abcdef"
PARTIALS = [
    # (file name, age in seconds, stale)
    *[(f".{HOST}-{{dead}}-{UUID}.partial", age, True) for age in (0, 5, 10_000)],
    *[(f".{HOST}-{{alive}}-{UUID}.partial", age, age > STALE_PARTIAL_S) for age in (0, 5, 10_000)],
    *[(f".{HOST}-{{mine}}-{UUID}.partial", age, False) for age in (0, 10_000)],
    *[(f".other-node-{{dead}}-{UUID}.partial", age, age > STALE_PARTIAL_S) for age in (0, 599, 601, 10_000)],
    *[(f".{UUID}.partial", age, age > STALE_PARTIAL_S) for age in (0, 599, 601)],  # the older name
    *[
        (name, 10_000, False)
        for name in (".notes.partial", "x.partial", f"{UUID}.partial", "last.ckpt", ".hidden")
    ],
]


@pytest.mark.parametrize(("name", "age", "stale"), PARTIALS)
@pytest.mark.parametrize("where", ["version_0/checkpoints", "version_3", "."])
def test_only_stale_partials_are_removed(tmp_path, pids, name, age, stale, where):
    path = tmp_path / "runs" / "exp" / where / name.format(**pids)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PK partial")
    os.utime(path, (time.time() - age, time.time() - age))
    removed = remove_stale_partials([], [tmp_path / "runs" / "exp"])
    assert removed == ([path] if stale else []) and path.exists() != stale


def test_a_full_disk_says_so_plainly_with_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import builtins

    from vlp.platform.run import checkpoints

    target = tmp_path / "checkpoints" / "step=6.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 3}, target)
    monkeypatch.setattr(
        checkpoints, "open", lambda path, mode: builtins.open("/dev/full", mode), raising=False
    )
    with pytest.raises(OSError) as error:
        AtomicCheckpointIO().save_checkpoint({"weights": torch.zeros(1 << 20)}, target)
    assert error.value.errno == errno.ENOSPC
    assert str(error.value).startswith(
        f"[Errno 28] No space left on device while saving the checkpoint {target}"
    )
    assert torch.load(target, weights_only=True) == {"step": 3}
    assert [path.name for path in target.parent.iterdir()] == ["step=6.ckpt"]


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
        RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
    ],
)
def test_other_save_errors_pass_unchanged_unless_the_disk_is_full(tmp_path, monkeypatch, error):
    from vlp.platform.run import checkpoints

    def failing_save(obj, file):
        if isinstance(error, OSError):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from error
        raise error

    monkeypatch.setattr(checkpoints.torch, "save", failing_save)
    target = tmp_path / "last.ckpt"
    with pytest.raises((OSError, RuntimeError)) as raised:
        AtomicCheckpointIO().save_checkpoint({}, target)
    full = isinstance(error, OSError)
    assert ("No space left on device while saving the checkpoint" in str(raised.value)) == full
    assert (str(target) in str(raised.value)) == full
    assert list(tmp_path.iterdir()) == []
