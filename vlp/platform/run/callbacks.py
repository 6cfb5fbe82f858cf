"""Trainer callbacks: non-finite loss guard, sampler feedback, throughput, the final validation, the
step progress bar, the metrics.json summary.

They reach the data module and model only through duck-typed attributes (`trainer.datamodule.observe`,
`pl_module.mode`), so the platform never imports tasks or data modules.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor

from vlp.platform.distributed.collectives import all_gather_objects


class NonFiniteLossError(RuntimeError):
    pass


def logs_this_step(trainer: Trainer) -> bool:
    """Whether the loggers write this training step (every `log_every_n_steps`, and when the run stops).

    A monitor's per-step value logged on other steps reaches no logger, and each `self.log` call costs
    Lightning bookkeeping that shows in a small model's step
    (benchmarks/results/2026-12-02-epyc-2cpu-make-train.md), so the monitors log only here, as Lightning's
    own LearningRateMonitor and ThroughputMonitor do; so do the objectives' values other than their losses
    (`TrainableModule.log_objective`).
    """
    # Private API (lightning 2.6.6, tests/test_private_apis.py): the loop's own rule for the steps it writes
    # (log_every_n_steps, the last batch, a stop); no public property states it
    return trainer._logger_connector.should_update_logs


class NonFiniteLossGuard(Callback):
    """Skips the optimizer step of a batch whose loss is NaN or inf, logs the count, and stops the run
    with a clear error after `max_consecutive` such batches in a row.

    The decision is reduced over ranks (any rank non-finite -> every rank skips), so DDP stays in step. It
    is reduced once per optimizer step, just before it (after the gradients are reduced, when the ranks
    meet anyway), not before each backward: a collective there made every rank wait for the slowest one
    an extra time a step. Skipping sets every gradient to None before the step: AdamW then leaves weights
    and moments alone. With gradient accumulation one non-finite micro-batch skips the step.
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped = 0
        self._local_nonfinite = False  # this rank saw a non-finite loss since the last optimizer step

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        if not bool(torch.isfinite(loss.detach()).all()):
            self._local_nonfinite = True

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        skip = trainer.strategy.reduce_boolean_decision(self._local_nonfinite, all=False)
        self._local_nonfinite = False
        if not skip:
            self.consecutive = 0
            return
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None
        self.skipped += 1
        self.consecutive += 1
        pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True)
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} non-finite losses in a row at global step {trainer.global_step} "
                f"(limit nonfinite_guard.max_consecutive={self.max_consecutive}); stopping. "
                "Lower the learning rate, check the data, or use fp32/bf16 precision."
            )

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.consecutive, self.skipped = int(state_dict["consecutive"]), int(state_dict["skipped"])


def pickle_free_python_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


class RandomStateCheckpoint(Callback):
    """Saves the torch / numpy / python RNG states of every rank in the checkpoint and restores each
    rank's own when training starts, after everything that runs between restore and the first step
    (sanity checks, loaders). Ranks draw different masks and negatives, so restoring rank 0's state
    everywhere would change every other rank's batches after a resume.

    `state_dict` gathers from all ranks: like every checkpoint save, it must run on all of them."""

    def __init__(self) -> None:
        self._to_restore: list[dict] | None = None
        self._world_size = 1

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._world_size = trainer.world_size

    def state_dict(self) -> dict:
        """Plain tensors, ints and strings only, so checkpoints load with `weights_only=True`."""
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        local = {
            "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
            "python": pickle_free_python_state(random.getstate()),
        }
        return {"ranks": all_gather_objects(local) if self._world_size > 1 else [local]}

    def load_state_dict(self, state_dict: dict) -> None:
        self._to_restore = state_dict["ranks"] if "ranks" in state_dict else [state_dict]

    def on_train_start(self, trainer: Trainer | None, pl_module: LightningModule | None) -> None:
        if self._to_restore is None:
            return
        ranks, self._to_restore = self._to_restore, None
        rank = trainer.global_rank if trainer is not None else 0
        if len(ranks) != (trainer.world_size if trainer is not None else 1):
            rank_zero_warn(
                f"checkpoint holds random states of {len(ranks)} rank(s), this run has "
                f"{trainer.world_size if trainer is not None else 1}: every rank starts from rank 0's"
            )
            rank = 0
        state = ranks[rank]
        torch.set_rng_state(state["torch"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))


class SamplerMonitor(Callback):
    """Feeds each step's losses (averaged over ranks) back to the data module's sampler when its strategy
    uses them, and logs the sampler probabilities as `train/sampler/p_<objective>`.

    Sampled steps report the loss of the objective they served; joint steps (`objective_losses` in the
    step output) report every objective's loss.
    """

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        datamodule = trainer.datamodule
        sampler = getattr(datamodule, "sampler", None)
        if sampler is None or not isinstance(batch, dict) or not isinstance(outputs, dict):
            return
        if getattr(datamodule, "wants_losses", False):
            losses = outputs.get("objective_losses") or {datamodule.step_plan.objective: outputs["loss"]}
            stacked = torch.stack([loss.detach().float() for loss in losses.values()])
            reduced = trainer.strategy.reduce(stacked, reduce_op="mean").tolist()
            datamodule.observe(dict(zip(losses, reduced, strict=True)))
        if logs_this_step(trainer):
            for name, p in sampler.probabilities().items():
                pl_module.log(f"train/sampler/p_{name}", p, on_step=True, on_epoch=False)


class ThroughputMonitor(Callback):
    """Logs `perf/samples_per_s`: samples of all ranks per wall-clock second of the training loop."""

    def __init__(self, window: int = 20) -> None:
        self.window = window
        self._times: list[tuple[float, int]] = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        samples = int(batch["image"].shape[0]) * trainer.world_size if isinstance(batch, dict) else 0
        self._times.append((time.perf_counter(), samples))
        self._times = self._times[-(self.window + 1) :]
        if len(self._times) > 1 and logs_this_step(trainer):
            elapsed = self._times[-1][0] - self._times[0][0]
            count = sum(n for _, n in self._times[1:])
            pl_module.log("perf/samples_per_s", count / max(elapsed, 1e-9), on_step=True, on_epoch=False)


def finite_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, Tensor):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, int | float) and math.isfinite(value):
            out[key] = float(value)
    return dict(sorted(out.items()))


SUMMARY_GROUPS = ("retrieval", "retrieval_itm", "itm", "mlm", "caption", "grounding", "zeroshot", "vqa")
SUMMARY_PREFIXES = (*(f"val/{group}/" for group in SUMMARY_GROUPS), "test/")


class MetricsSummary(Callback):
    """Writes the final scalar metrics of every fit / validate / test to `<run folder>/metrics.json`
    (flat JSON object, key -> number) and prints the scores and the file's path."""

    def _write(self, trainer: Trainer) -> None:
        metrics = finite_scalars(trainer.callback_metrics)
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        self._dump(folder, metrics)

    @rank_zero_only
    def _dump(self, folder: Path, metrics: dict[str, float]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        path = (folder / "metrics.json").resolve()
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
        tmp.replace(path)
        scores = {k: v for k, v in metrics.items() if k.startswith(SUMMARY_PREFIXES)}
        lines = [f"  {key:<28} {value:.4f}" for key, value in scores.items()]
        print("\n".join(["Scores:", *lines, f"metrics.json: {path}"]), flush=True)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for callback in trainer.callbacks:
            if isinstance(callback, FinalValidation):
                callback.validate_if_resumed_at_end(trainer)
        self._write(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._write(trainer)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)


class FinalValidation(Callback):
    """Ends every fit with a validation: when the last step is not a validation step (`max_steps` not a
    multiple of `val_check_interval`), Lightning would stop without one and metrics.json would hold no
    final scores. Asking the trainer to stop on the last step makes its own loop validate once more
    (never twice: a validation step already due runs once).

    A fit resumed from a checkpoint of its last step (a run killed after that checkpoint, before its
    metrics.json) trains nothing, and Lightning's loop then ends without validating: `validate_if_resumed
    _at_end` runs the validation loop once at the end of such a fit, so its scores are written after all.
    `MetricsSummary` calls it before writing metrics.json (it runs first among the fit-end hooks).
    """

    def __init__(self) -> None:
        self._trained_or_validated = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trained_or_validated = True

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.enable_validation and is_last_training_step(trainer):
            trainer.should_stop = True

    def validate_if_resumed_at_end(self, trainer: Trainer) -> None:
        if self._trained_or_validated or trainer.global_step == 0 or not trainer.enable_validation:
            return
        self._trained_or_validated = True
        stage = trainer.state.stage
        trainer.validating = True  # so the logger connector and the hooks see a validation
        val_loop = trainer.fit_loop.epoch_loop.val_loop
        val_loop.restarting = False  # the checkpoint may have been saved inside the last validation
        val_loop.batch_progress.reset()
        with torch.no_grad():
            val_loop.run()
        trainer.state.stage = stage

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.validate_if_resumed_at_end(trainer)


# optimizer settings a resumed run takes from its config, and where the config sets them
CONFIGURED_GROUP_KEYS = {
    "initial_lr": "optim.lr (with optim.lr_scales)",
    "weight_decay": "optim.weight_decay",
    "betas": "optim.beta1 / optim.beta2",
    "eps": "the optimizer's eps",
}


class ResumeWithConfiguredOptimizer(Callback):
    """A resumed fit trains with its config's optimizer settings, not the checkpoint's.

    Lightning restores the optimizer's parameter groups and the scheduler's base learning rates from the
    checkpoint, so a new `optim.lr` or `optim.weight_decay` given on resume would be silently ignored.
    This callback keeps the settings the model configured (read before the restore) and puts them back
    after it: the moments and the step count stay the checkpoint's, the learning rate becomes the new base
    rate times the schedule's factor at the restored step (the schedule's shape, `warmup`, `min_lr_ratio`
    and the total steps, already comes from the config). A scheduler that cannot be re-based (not a
    `LambdaLR`) with a changed learning rate is refused, naming the key. What changed is printed.
    """

    def __init__(self) -> None:
        self._configured: list[list[dict]] | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._configured = [
            [
                {key: value for key, value in group.items() if key != "params"}
                for group in optimizer.param_groups
            ]
            for optimizer in trainer.optimizers
        ]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        configured, self._configured = self._configured, None
        if not trainer.ckpt_path or configured is None:
            return
        changes: list[str] = []
        for optimizer, groups in zip(trainer.optimizers, configured, strict=True):
            for number, (group, wanted) in enumerate(zip(optimizer.param_groups, groups, strict=True)):
                for key, value in wanted.items():
                    if key == "lr" or group.get(key) == value:
                        continue
                    if key in CONFIGURED_GROUP_KEYS:
                        changes.append(
                            f"{CONFIGURED_GROUP_KEYS[key]} of group {number}: {group.get(key)} -> {value}"
                        )
                    group[key] = value
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            bases = [group.get("initial_lr", group["lr"]) for group in scheduler.optimizer.param_groups]
            if list(scheduler.base_lrs) == bases:
                continue
            if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                raise ValueError(
                    f"resume: the learning rate changed (optim.lr: {scheduler.base_lrs} in the checkpoint, "
                    f"{bases} now) and a {type(scheduler).__name__} cannot take a new one mid-schedule; "
                    "resume with the checkpoint's optim.lr or start a new run from its weights"
                )
            scheduler.base_lrs = bases
            step = scheduler.last_epoch
            rates = [base * factor(step) for base, factor in zip(bases, scheduler.lr_lambdas, strict=True)]
            for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
                group["lr"] = rate
            # Private API (torch 2.14.1, tests/test_private_apis.py): `get_last_lr()` reads `_last_lr` and
            # there is no setter; a step() would advance the schedule
            scheduler._last_lr = rates
        if changes:
            rank_zero_info(
                "resume: the config's optimizer settings replace the checkpoint's: " + "; ".join(changes)
            )


def is_last_training_step(trainer: Trainer) -> bool:
    """Whether the step that just ran is the fit's last, by `max_steps` or by the last batch of `max_epochs`."""
    if 0 <= trainer.max_steps <= trainer.global_step:
        return True
    last_epoch = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs >= 0
    return last_epoch and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


def short_metric_name(key: str) -> str:
    """`train/itc/loss` -> `itc`, `train/loss` -> `loss`, anything else unchanged."""
    parts = key.split("/")
    if parts[0] == "train" and parts[-1] == "loss":
        return parts[1] if len(parts) == 3 else "loss"
    return key


class StepProgressBar(TQDMProgressBar):
    """One bar for the whole fit: optimizer steps out of the total (`max_steps`, or every epoch's
    batches), resumed runs starting where they stopped, and each loss under its objective's name
    (`loss=5.1, itc=2.31, itm=0.69`) instead of per-epoch counts and long tags."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.train_progress_bar = self.init_train_tqdm()
        total = trainer.estimated_stepping_batches
        self.train_progress_bar.reset(total=None if math.isinf(total) else int(total))
        self.train_progress_bar.set_description("Steps")
        self._show(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Trainer, *_: Any) -> None:
        """Keeps the one bar across epochs."""

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._should_update(trainer.global_step, self.train_progress_bar.total):
            self._show(trainer, pl_module)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._show(trainer, pl_module)

    def _show(self, trainer: Trainer, pl_module: LightningModule) -> None:
        bar = self.train_progress_bar
        if bar.disable:
            return
        bar.n = trainer.global_step
        bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        bar.refresh()

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return {short_metric_name(key): value for key, value in items.items()}
