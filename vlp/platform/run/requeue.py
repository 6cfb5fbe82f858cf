"""Slurm auto-requeue at a step boundary that every rank agrees on.

Lightning's `SLURMEnvironment(auto_requeue=True)` does the work: on the requeue signal (USR1) its
handler saves `hpc_ckpt_<n>.ckpt` in the trainer's root folder (with a barrier across ranks), rank 0
runs `scontrol requeue`, and the rerun resumes from that file. But a signal handler runs wherever each
rank happens to be: under DDP one rank's barrier can meet another rank's gradient all-reduce (gloo
then fails or hangs), and a checkpoint taken in the middle of a step has already consumed that step's
batch. `RequeueAtStepBoundary` keeps Lightning's handler and moves only the moment it runs: the signal
sets a flag; after each training step the ranks reduce the flag (any rank signalled -> all); then every
rank calls Lightning's handler at the same point (with gradient accumulation: at the end of an optimizer
step, never between its micro-batches), where a checkpoint resumes exactly, and waits for the
SIGTERM with which Slurm ends the job, so no step after the checkpoint is trained or logged twice.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType
from typing import Any

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

log = logging.getLogger(__name__)


class RequeueAtStepBoundary(Callback):
    """Defers Lightning's Slurm requeue handler to the end of a training step (or of that step's
    validation, when one is due), on all ranks together.

    `sigterm_timeout_s`: how long to wait for Slurm's SIGTERM after the requeue before training on
    (the requeue failed, e.g. a job submitted without `--requeue`).
    """

    def __init__(self, sigterm_timeout_s: float = 300.0) -> None:
        self.sigterm_timeout_s = sigterm_timeout_s
        self._lightning_handler: Any = None
        self._signum: int | None = None
        self._signalled = False
        self._after_validation = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # the environment Lightning's signal connector reads (also for one process, which has no parallel
        # strategy to ask). Private API (lightning 2.6.6, tests/test_private_apis.py): Lightning exposes the
        # cluster environment only through a parallel strategy, and a one-process Slurm job has none
        environment = trainer._accelerator_connector.cluster_environment
        if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
            return
        signum = environment.requeue_signal
        handler = signal.getsignal(signum)
        if not callable(handler):  # not registered (e.g. not the main thread): nothing to defer
            return
        self._lightning_handler, self._signum = handler, int(signum)
        signal.signal(signum, self._note_signal)

    def _note_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("Requeue signal %s received; requeueing after the current step", signum)
        self._signalled = True

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._lightning_handler is None or self._after_validation:
            return
        if not trainer.strategy.reduce_boolean_decision(self._signalled, all=False):
            return
        # Private API (lightning 2.6.6, tests/test_private_apis.py): whether the loop is inside an
        # accumulation window and whether it validates after this batch are the loop's own decisions; no
        # public property states them, and recomputing them here would drift from the loop's rules
        if trainer.fit_loop._should_accumulate():
            return  # inside an optimizer step of accumulated micro-batches, whose gradients no checkpoint holds
        self._signalled = True
        if 0 <= trainer.max_steps <= trainer.global_step:
            return  # the last step: the job ends on its own, nothing left to resume
        # Lightning validates after on_train_batch_end; a requeue now would lose that validation
        if trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            self._after_validation = True
        else:
            self._requeue(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._after_validation and not trainer.sanity_checking:
            if trainer.fit_loop._should_accumulate():
                self._after_validation = False  # it validated inside an optimizer step: wait for its end
                return
            self._requeue(trainer)

    def _requeue(self, trainer: Trainer) -> None:
        self._signalled = self._after_validation = False
        self._lightning_handler(self._signum, None)
        deadline = time.monotonic() + self.sigterm_timeout_s
        while not trainer.received_sigterm and time.monotonic() < deadline:
            time.sleep(0.1)
        if not trainer.received_sigterm:
            rank_zero_warn(
                f"Requeue requested at step {trainer.global_step} but Slurm did not end the job within "
                f"{self.sigterm_timeout_s:.0f} s; training continues (was the job submitted with --requeue?)"
            )

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._lightning_handler = self._signum = None
        self._signalled = self._after_validation = False
