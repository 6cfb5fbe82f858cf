"""What every runnable module shares, and the Objective contract.

An objective computes its loss and the values to log in `forward_loss`, its validation in
`validation_update` / `validation_scores`. Whoever runs (the objective alone, or `MultiTaskModule`)
does the logging: a LightningModule nested in another has no trainer of its own, so objectives never
call `self.log` from these methods.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import Tensor
from torch.optim import Optimizer

from vlp.platform.distributed.deepspeed_zero import optimizer_stepped
from vlp.platform.distributed.outside_step import outside_step
from vlp.platform.distributed.parallelize import parallelize
from vlp.platform.model.architecture import ARCHITECTURE_KEY
from vlp.platform.model.backbone import FeatureCache, FusionBackbone, batch_size_of, first_rows
from vlp.platform.optim import OptimConfig, build_optimizer
from vlp.platform.run.callbacks import logs_this_step
from vlp.platform.run.fused_optimizer import fused_optimizer_fits


class ObjectiveOutput(NamedTuple):
    loss: Tensor  # scalar
    logs: dict[str, Tensor]  # short keys ("loss", "acc"), logged as <stage>/<objective>/<key>


def real_rows(batch: dict) -> Tensor:
    """[B] bool: rows that are not `is_padding` repeats (added so every rank gets as many eval batches);
    whole-split metrics count only these, so each sample counts once whatever the number of ranks."""
    padding = batch.get("is_padding")
    if padding is None:
        return torch.ones(batch_size_of(batch), dtype=torch.bool, device=batch["image"].device)
    return ~padding.to(device=batch["image"].device, dtype=torch.bool)


class TrainableModule(LightningModule):
    """Optimizer, schedule and logging shared by single objectives and the multi-task module."""

    def __init__(self, optim: OptimConfig | None = None) -> None:
        super().__init__()
        self.optim = optim or OptimConfig()

    # set by the TensorBoard pictures callback (`ValidationImages`) for the validation step that draws them
    pictures_requested: int = 0

    def requested_pictures(self, batch: dict) -> dict[str, Any] | None:
        """The step's output when `ValidationImages` asked for pictures (of the first `pictures_requested`
        samples): drawn inside the step, where a sharded strategy has gathered the parameters."""
        if not self.pictures_requested:
            return None
        # pictures read no reference captions (`reference_*`, R rows), which `first_rows` cannot cut by rows
        per_row = {key: value for key, value in batch.items() if not key.startswith("reference_")}
        with torch.no_grad():
            return {"pictures": self.pictures(first_rows(per_row, self.pictures_requested))}

    def configure_model(self) -> None:
        """The trainer strategy's scaling plan (sharding, checkpointing, compile), applied once."""
        if not getattr(self, "_parallelized", False):
            parallelize(self, self.trainer.strategy)
            self._parallelized = True

    def configure_optimizers(self) -> dict:
        steps = int(self.trainer.estimated_stepping_batches)
        return build_optimizer(self, self.optim, steps, fused=fused_optimizer_fits(self.trainer, self))

    def configure_gradient_clipping(
        self,
        optimizer: Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, which also clips a fused AdamW under `bf16-mixed`. Lightning's mixed-precision
        plugin refuses to clip for any optimizer that unscales gradients in its step; that matters only when a
        loss scaler has scaled them (`16-mixed`, where `fused_optimizer_fits` keeps AdamW unfused). bf16
        autocast scales nothing, so the gradients are clipped as they are, as without mixed precision."""
        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            algorithm = GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM)
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val or 0.0, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Every checkpoint carries its backbone's architecture, so evaluation and fine-tuning rebuild the
        model from it (`vlp.cli.architecture`)."""
        backbone = getattr(self, "backbone", None)
        if backbone is not None:
            checkpoint[ARCHITECTURE_KEY] = backbone.architecture

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the momentum model's EMA update (when the backbone keeps one): once per
        optimizer step, also under DeepSpeed, which is called on every accumulated micro-batch."""
        super().optimizer_step(*args, **kwargs)
        momentum = getattr(getattr(self, "backbone", None), "momentum", None)
        if momentum is not None and optimizer_stepped(self.trainer.strategy):
            momentum.update()

    def log_objective(self, stage: str, name: str, logs: dict[str, Tensor], batch_size: int) -> None:
        """Logs `<stage>/<name>/<key>`. In training the loss every step (the progress bar, and a checkpoint
        or early-stopping callback may watch it), the other values only on the steps the loggers write:
        each `self.log` call costs Lightning bookkeeping that shows in a small model's step."""
        on_step = stage == "train"
        if on_step and not self._logs_every_value():
            logs = {"loss": logs["loss"]} if "loss" in logs else {}
        for key, value in logs.items():
            self.log(
                f"{stage}/{name}/{key}",
                value.detach(),
                on_step=on_step,
                on_epoch=not on_step,
                batch_size=batch_size,
                prog_bar=key == "loss" and on_step,
                sync_dist=not on_step,
            )

    def _logs_every_value(self) -> bool:
        """Whether this training step logs every value: outside a trainer, on the steps the loggers write,
        and on the run's last step (its values reach `callback_metrics` and metrics.json)."""
        if self._trainer is None:
            return True
        trainer = self.trainer
        return logs_this_step(trainer) or 0 < trainer.max_steps <= trainer.global_step + 1

    def log_scores(self, scores: dict[str, float | Tensor]) -> None:
        """Whole-split metrics, already computed over every rank (torchmetrics syncs them). `sync_dist`
        averages equal values, which changes none of them and keeps Lightning from warning on every
        multi-rank validation that they were not synced."""
        for key, value in scores.items():
            self.log(key, torch.as_tensor(value, dtype=torch.float32), rank_zero_only=False, sync_dist=True)

    def log_test_scores(self, scores: dict[str, float | Tensor]) -> None:
        """Whole-split metrics of a test run: the validation metrics, computed on the test split, logged
        under `test/` instead of `val/`."""
        self.log_scores({key.replace("val/", "test/", 1): value for key, value in scores.items()})

    @property
    def attached_strategy(self) -> Strategy | None:
        """The trainer's strategy; None outside a trainer (e.g. a test calling the scores directly)."""
        return self._trainer.strategy if self._trainer is not None else None


def check_distillation(name: str, backbone: FusionBackbone, alpha: float, warmup_steps: int) -> None:
    """Clear errors for an objective's momentum-distillation arguments."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{name}: alpha must be in [0, 1], got {alpha}")
    if warmup_steps < 0:
        raise ValueError(f"{name}: alpha_warmup_steps must be >= 0, got {warmup_steps}")
    if alpha > 0 and backbone.momentum is None:
        raise ValueError(
            f"{name}: alpha > 0 distils from the backbone's momentum model; "
            "set backbone.init_args.momentum: {decay: 0.995}"
        )


class Objective(TrainableModule):
    """One pre-training objective on the shared backbone; trains alone or inside MultiTaskModule."""

    name: ClassVar[str]
    # scores against every rank's rows through `vlp.tasks.global_rows` (ITC, ITM): a joint step of two
    # such objectives gathers them once
    reads_global_rows: ClassVar[bool] = False

    def __init__(self, backbone: FusionBackbone, optim: OptimConfig | None = None) -> None:
        super().__init__(optim)
        self.backbone = backbone

    @property
    def objective_names(self) -> list[str]:
        return [self.name]

    def forward_loss(self, batch: dict, features: FeatureCache) -> ObjectiveOutput:
        raise NotImplementedError

    def current_step(self) -> int:
        """The optimizer step, from the trainer of the module that runs this objective: its own when it runs
        alone, the one `MultiTaskModule` shares with the objectives it holds; 0 outside a trainer."""
        return self.global_step

    def validation_update(self, batch: dict, features: FeatureCache) -> dict[str, Tensor]:
        """Per-batch validation values to log (averaged over the epoch); also updates whole-split metrics."""
        return self.forward_loss(batch, features).logs

    def validation_scores(self) -> dict[str, float]:
        """Whole-split metrics under their docs/design.md names (e.g. `val/retrieval/t2i_r1`); resets them."""
        return {}

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        out = self.forward_loss(batch, FeatureCache(self.backbone, batch))
        self.log_objective("train", self.name, out.logs, batch_size_of(batch))
        return out.loss

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, Any] | None:
        logs = self.validation_update(batch, FeatureCache(self.backbone, batch))
        self.log_objective("val", self.name, logs, batch_size_of(batch))
        return self.requested_pictures(batch)

    def on_validation_epoch_end(self) -> None:
        self.log_scores(self.scores_of_split())

    def test_step(self, batch: dict, batch_idx: int) -> None:
        logs = self.validation_update(batch, FeatureCache(self.backbone, batch))
        self.log_objective("test", self.name, logs, batch_size_of(batch))

    def on_test_epoch_end(self) -> None:
        self.log_test_scores(self.scores_of_split())

    def scores_of_split(self) -> dict[str, float]:
        """`validation_scores`, which may call the network (ITM re-ranking), outside the strategy's step."""
        with outside_step(self, self.attached_strategy):
            return self.validation_scores()

    def predict_step(self, batch: dict, batch_idx: int) -> Any:
        return {"image_id": batch["image_id"], **self.predict(batch, FeatureCache(self.backbone, batch))}

    def validation_images(self, batch: dict, features: FeatureCache) -> dict[str, Tensor]:
        """Pictures for TensorBoard, tag -> uint8 images [N, 3, H, W] (empty when it has none)."""
        return {}

    def pictures(self, batch: dict) -> dict[str, Tensor]:
        """Every picture this module draws for `batch`, tag -> uint8 [N, 3, H, W]."""
        return self.validation_images(batch, FeatureCache(self.backbone, batch))

    def predict(self, batch: dict, features: FeatureCache) -> dict[str, Any]:
        """Per-image outputs of this objective for `vlp predict` (empty when it has none)."""
        return {}
