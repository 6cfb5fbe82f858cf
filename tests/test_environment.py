"""Tests give back the process environment they found (the autouse fixtures of tests/conftest.py).

Lightning's script launcher, run in-process by a test's Trainer under a DDP-family strategy, sets the
rank variables in `os.environ` for good; a later `vlp fit --trainer.devices=2` subprocess inheriting
LOCAL_RANK would start no second rank and wait for it (the xdist hang of
tests/distributed/test_momentum_sharded.py). The two tests run in file order: the first leaves the
variables behind, the second sees the environment of before.
"""

from __future__ import annotations

import os

import pytest
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

LAUNCH_NAMES = ("LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")
BEFORE: dict[str, str | None] = {}


def test_an_in_process_launch_leaves_the_rank_variables_in_os_environ(monkeypatch: pytest.MonkeyPatch):
    BEFORE.update({name: os.environ.get(name) for name in LAUNCH_NAMES})
    for name in LAUNCH_NAMES:
        monkeypatch.delenv(name, raising=False)  # put back by monkeypatch only where they were set before
    launcher = _SubprocessScriptLauncher(LightningEnvironment(), num_processes=1, num_nodes=1)
    assert launcher.launch(lambda: "ran") == "ran"
    assert os.environ["LOCAL_RANK"] == "0"
    assert os.environ["WORLD_SIZE"] == "1"
    assert int(os.environ["MASTER_PORT"]) > 0
    assert LightningEnvironment().creates_processes_externally  # what a `vlp fit` subprocess would think


def test_the_next_test_sees_the_environment_of_before_the_launch():
    assert BEFORE, "runs after the test above, in the same process"
    assert {name: os.environ.get(name) for name in LAUNCH_NAMES} == BEFORE
