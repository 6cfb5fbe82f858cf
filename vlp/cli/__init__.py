"""The `vlp` command: LightningCLI's fit / validate / test / predict over vlp's modules and data.

The only module that knows platform, tasks and data modules together: it links the data's tokenizer
into the backbone, so the text tower's vocabulary always matches the data.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from vlp.datamodules.multitask import MultiTaskDataModule
from vlp.platform.callbacks import (
    MetricsSummary,
    NonFiniteLossGuard,
    RandomStateCheckpoint,
    SamplerMonitor,
    ThroughputMonitor,
)
from vlp.platform.perf import FlopsMonitor
from vlp.platform.prediction_writer import PredictionWriter
from vlp.platform.visualization import ValidationImages
from vlp.tasks.base import TrainableModule


class VLPCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(NonFiniteLossGuard, "nonfinite_guard")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.filename": "{step}"})
        parser.link_arguments(
            "data.tokenizer", "model.init_args.backbone.init_args.tokenizer", apply_on="instantiate"
        )


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
                FlopsMonitor(every_n_steps=100),
                SamplerMonitor(),
                MetricsSummary(),
                RandomStateCheckpoint(),
                PredictionWriter(),
                ValidationImages(),
            ],
        },
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
    )


def main() -> None:
    """The `vlp` console script; returns None so the process exits 0 on success."""
    run()


if __name__ == "__main__":
    main()
