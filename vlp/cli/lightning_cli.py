"""`vlp fit | validate | test | predict`: LightningCLI over vlp's modules and data.

It links the data's tokenizer into the backbone, so the text tower's vocabulary always matches the data, and
builds the backbone from a checkpoint's stored architecture where the config names none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_info

from vlp.cli.architecture import backbone_from_checkpoint
from vlp.cli.source_overrides import add_source_overrides, apply_source_overrides
from vlp.datamodules.multitask import MultiTaskDataModule
from vlp.platform.distributed.strategies import allow_unused_parameters
from vlp.platform.run.callbacks import (
    FinalValidation,
    MetricsSummary,
    NonFiniteLossGuard,
    RandomStateCheckpoint,
    ResumeWithConfiguredOptimizer,
    SamplerMonitor,
    StepProgressBar,
    ThroughputMonitor,
)
from vlp.platform.run.checkpoints import AtomicCheckpointIO, StalePartialsCleanup, newest_complete_checkpoint
from vlp.platform.run.perf import FlopsMonitor
from vlp.platform.run.precision import fp16_mixed_on_cpu
from vlp.platform.run.prediction_writer import PredictionWriter
from vlp.platform.run.requeue import RequeueAtStepBoundary
from vlp.platform.run.skipped_samples import SkippedSamplesMonitor
from vlp.platform.run.visualization import ValidationImages
from vlp.tasks.base import TrainableModule


class VLPCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(NonFiniteLossGuard, "nonfinite_guard")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.filename": "{step}"})
        parser.link_arguments(
            "data.tokenizer", "model.init_args.backbone.init_args.tokenizer", apply_on="instantiate"
        )
        add_source_overrides(parser)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        apply_source_overrides(config)
        backbone_from_checkpoint(config, self.subcommand)

    # Private API (lightning 2.6.6, tests/test_private_apis.py): the one LightningCLI hook that sees the
    # trainer's parsed arguments and the default callbacks before the Trainer exists; `instantiate_trainer`
    # (public) gets neither in the form the plugins and callbacks below must change
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        """Drops the learning-rate monitor when the logger is off (`--trainer.logger false`), adds the step
        progress bar unless the bar is off or the config brings its own, atomic
        checkpoint writes unless the config brings its own checkpoint IO, and fp16 autocast with a loss
        scaler for `precision: 16-mixed` on the CPU (Lightning would switch to bf16-mixed)."""
        if config.get("logger") is False:  # LearningRateMonitor stops a run that has no logger to write to
            defaults = self.trainer_defaults.get("callbacks") or []
            self.trainer_defaults = {
                **self.trainer_defaults,
                "callbacks": [c for c in defaults if not isinstance(c, LearningRateMonitor)],
            }
        own_bar = any(isinstance(c, ProgressBar) for c in [*callbacks, *(config.get("callbacks") or [])])
        if config.get("enable_progress_bar") is not False and not own_bar:
            callbacks = [*callbacks, StepProgressBar()]
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins = config["plugins"] = [*plugins, AtomicCheckpointIO()]
        cpu_fp16 = fp16_mixed_on_cpu(
            config.get("precision"), config.get("accelerator"), config.get("strategy")
        )
        if cpu_fp16 is not None:
            config["precision"], config["plugins"] = None, [*plugins, cpu_fp16]
        return super()._instantiate_trainer(config, callbacks)

    def resolve_last_checkpoint(self) -> None:
        """`--ckpt_path last`: the newest complete checkpoint of the whole experiment (every version
        folder under the logger's `<save_dir>/<name>/`), not only of this run's new, empty folder."""
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") != "last":
            return
        logger = self.trainer.logger
        experiment = Path(getattr(logger, "root_dir", None) or self.trainer.default_root_dir)
        newest = newest_complete_checkpoint(experiment)
        if newest is not None:
            rank_zero_info(f"--ckpt_path last: resuming from {newest}")
            config["ckpt_path"] = str(newest)

    # LightningCLI calls `before_<subcommand>`; every subcommand that takes --ckpt_path resolves `last` alike
    before_fit = before_validate = before_test = before_predict = resolve_last_checkpoint

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        allow_unused_parameters(self.trainer.strategy)


def run(args: list[str] | None = None) -> VLPCLI:
    """Parse `args` (default: the command line), run the subcommand, return the CLI (trainer, model, data)."""
    return VLPCLI(
        model_class=TrainableModule,
        subclass_mode_model=True,
        datamodule_class=MultiTaskDataModule,
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": "runs", "name": "default"},
            },
            "callbacks": [
                LearningRateMonitor(logging_interval="step"),
                ThroughputMonitor(),
                FlopsMonitor(every_n_steps=250),
                SamplerMonitor(),
                MetricsSummary(),
                RandomStateCheckpoint(),
                PredictionWriter(),
                PredictionWriter(filename="answers.json", key="answers", id_key="question_id"),
                ValidationImages(),
                FinalValidation(),
                RequeueAtStepBoundary(),
                SkippedSamplesMonitor(),
                StalePartialsCleanup(),
                ResumeWithConfiguredOptimizer(),
            ],
        },
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
    )
