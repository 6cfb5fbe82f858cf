"""The `vlp` command: LightningCLI's fit / validate / test / predict over vlp's modules and data, and the
dispatch to the groups of other subcommands (`vlp data ...`, `vlp slurm ...`, ...), one module each.

The only package that knows platform, tasks and data modules together: it links the data's tokenizer
into the backbone, so the text tower's vocabulary always matches the data.
"""

from __future__ import annotations

import importlib
import sys

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
from vlp.platform.strategies import allow_unused_parameters
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


# subcommand -> module of this package with `main(argv: list[str]) -> int | None`; imported on use only
GROUPS: dict[str, str] = {"data": "data", "slurm": "slurm", "export": "export", "tensorboard": "tensorboard"}


def main(argv: list[str] | None = None) -> None:
    """The `vlp` console script: a group's subcommand, else LightningCLI. Exits 0 on success."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in GROUPS:
        module = importlib.import_module(f"{__name__}.{GROUPS[argv[0]]}")
        code = module.main(argv[1:])
        if code:
            raise SystemExit(code)
        return
    run(argv)


if __name__ == "__main__":
    main()
