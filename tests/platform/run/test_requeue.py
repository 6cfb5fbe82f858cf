"""The Slurm requeue at a step boundary, in one process without Slurm: the job's environment variables,
a stub `scontrol` that answers a requeue with SIGTERM (as Slurm does), and USR1 sent in the middle of a
step. The checkpoint must hold the end of that step (after its validation when one is due), and the
rerun must end with the weights of an uninterrupted run."""

import os
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException
from tensorboard_scalars import scalars as run_scalars

from vlp.cli import run

CONFIG = str(Path(__file__).parents[2] / "configs" / "tiny.yaml")


class SignalMidStep(Callback):
    """Sends USR1 to this process between forward and backward of the step at `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.fixture
def slurm_job(tmp_path, monkeypatch, one_thread):
    """A one-task Slurm job's environment and a `scontrol` that records the requeue and sends SIGTERM."""
    stub = tmp_path / "bin" / "scontrol"
    stub.parent.mkdir()
    stub.write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.log\nkill -TERM $PPID\n')
    stub.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub.parent}:{os.environ['PATH']}")
    variables = {
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_JOB_ID": "42",
        "SLURM_JOB_NAME": "t",
    }
    variables |= {
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": "localhost",
    }
    for key, value in variables.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    return run_scalars(folder / "default" / "version_0")


def fit(folder: Path, *extra: str):
    """Joint mode: every objective logs at every step, so the TensorBoard series compare step by step."""
    pins = ["--trainer.default_root_dir", str(folder), "--trainer.logger.init_args.save_dir", str(folder)]
    pins += ["--trainer.logger.init_args.version", "0"]
    return run(["fit", "--config", CONFIG, "--model.init_args.mode", "joint", *pins, *extra])


@pytest.mark.parametrize(
    ("signal_at", "saved_at"),
    [(3, 4), (2, 3)],  # step 4 is a plain step; step 3 validates first (val_check_interval 3)
)
def test_requeue_signal_mid_step_checkpoints_at_the_step_end_and_resumes_exactly(
    slurm_job, signal_at, saved_at
):
    folder = slurm_job / "run"
    with pytest.raises(SIGTERMException):
        fit(
            folder,
            "--trainer.callbacks+=tests.platform.run.test_requeue.SignalMidStep",
            f"--trainer.callbacks.step={signal_at}",
        )
    assert (slurm_job / "scontrol.log").read_text() == "requeue 42\n"
    checkpoint = torch.load(folder / "hpc_ckpt_1.ckpt", weights_only=True)
    assert checkpoint["global_step"] == saved_at

    resumed = fit(folder)  # the rerun: Lightning finds hpc_ckpt_1.ckpt in the run folder
    assert resumed.trainer.ckpt_path == str(folder / "hpc_ckpt_1.ckpt") and resumed.trainer.global_step == 6
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        del os.environ[key]  # the reference runs outside Slurm (monkeypatch restores them)
    straight = fit(slurm_job / "straight")
    resumed_log, straight_log = scalars(folder), scalars(slurm_job / "straight")
    assert [step for step, _ in resumed_log["train/loss"]] == list(range(6))  # each step once, both runs
    assert [step for step, _ in resumed_log["val/itc/loss"]] == [2, 5]  # no validation lost
    for tag in ("train/loss", "train/itc/loss", "train/mlm/loss", "val/itc/loss", "val/retrieval/t2i_r1"):
        assert resumed_log[tag] == straight_log[tag], tag
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)


def test_requeue_signal_inside_an_accumulated_step_waits_for_the_step_end_and_resumes_exactly(slurm_job):
    # 2 micro-batches per optimizer step; validation every 2 steps (val_check_interval counts batches).
    # USR1 comes during both micro-batches of step 4: the checkpoint waits for the step (and its validation)
    accumulate = ["--trainer.accumulate_grad_batches=2", "--trainer.val_check_interval=4"]
    folder = slurm_job / "run"
    with pytest.raises(SIGTERMException):
        fit(
            folder,
            *accumulate,
            "--trainer.callbacks+=tests.platform.run.test_requeue.SignalMidStep",
            "--trainer.callbacks.step=3",
        )
    checkpoint = torch.load(folder / "hpc_ckpt_1.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4
    resumed = fit(folder, *accumulate)
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        del os.environ[key]
    straight = fit(slurm_job / "straight", *accumulate)
    assert scalars(folder)["train/loss"] == scalars(slurm_job / "straight")["train/loss"]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)
