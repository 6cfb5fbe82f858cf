"""MultiTaskModule: several objectives on ONE backbone object.

The YAML gives the backbone once and each objective as a callable that takes it (jsonargparse builds
`Callable[[FusionBackbone], Objective]` from a class_path without `backbone`), so every objective holds
the identical module and the parameters exist once. Two modes:
- `sampled`: one objective per step, the one the MultiTaskSampler chose for it.
- `joint`: every objective on every batch, the unimodal passes computed once and shared. The loss is
  sum_i loss_weight_i * n * p_i with p the sampler's probabilities for the step, so the sampler
  strategy weights objectives instead of choosing one (round-robin: every weight 1; adaptive: more
  weight to objectives whose loss falls slowest). `row_fractions` lets an objective learn from the first
  rows of each rank's batch only (its own passes cost that share; the shared ones are sliced, not redone).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from vlp.platform.distributed.outside_step import outside_step
from vlp.platform.model.backbone import FeatureCache, FusionBackbone, first_rows
from vlp.platform.model.pretrained import LoadReport, load_pretrained, read_weights
from vlp.platform.optim import OptimConfig
from vlp.platform.step_plan import StepPlan
from vlp.tasks.base import Objective, TrainableModule, batch_size_of


class MultiTaskModule(TrainableModule):
    """Runs a mapping name -> objective on a shared backbone; logs `<stage>/<objective>/<key>`."""

    def __init__(
        self,
        backbone: FusionBackbone | None = None,
        objectives: dict[str, Callable[[FusionBackbone], Objective]] | None = None,
        mode: Literal["sampled", "joint"] = "sampled",
        loss_weights: dict[str, float] | None = None,
        optim: OptimConfig | None = None,
        init_from: str | None = None,
        row_fractions: dict[str, float] | None = None,
    ) -> None:
        """`row_fractions` (joint mode): objective -> the share of each rank's batch it reads, its first
        ceil(share * B) rows (batches are shuffled); e.g. `{mlm: 0.5}` halves MLM's own passes. Objectives
        scored over the global batch (ITC, ITM) read every row.

        `init_from`: a pre-training checkpoint (Lightning .ckpt or `vlp export` file) to start from: the
        backbone loads strictly, heads where they fit, new ones start fresh (both listed); the optimizer and
        schedule start fresh. A resumed run (`--ckpt_path`) restores its own checkpoint over it."""
        super().__init__(optim)
        if backbone is None:
            raise ValueError(
                "MultiTaskModule needs a backbone: the config's, or (through the CLI) the one stored in "
                "init_from's checkpoint"
            )
        self.init_from = init_from
        self.init_report: LoadReport | None = None  # what init_from loaded, once it has
        if not objectives:
            raise ValueError("objectives must name at least one objective")
        self.backbone = backbone
        self.objectives = nn.ModuleDict({name: build(backbone) for name, build in objectives.items()})
        for name, objective in self.objectives.items():
            if objective.backbone is not backbone:
                raise ValueError(f"objective {name!r} built its own backbone; it must take the shared one")
        self.mode = mode
        unknown = set(loss_weights or {}) - set(self.objectives)
        if unknown:
            raise ValueError(
                f"loss_weights names unknown objectives {sorted(unknown)}; known: {list(self.objectives)}"
            )
        self.loss_weights = {name: float((loss_weights or {}).get(name, 1.0)) for name in self.objectives}
        self.row_fractions = self._check_row_fractions(row_fractions or {})

    def _check_row_fractions(self, fractions: dict[str, float]) -> dict[str, float]:
        unknown = set(fractions) - set(self.objectives)
        if unknown:
            raise ValueError(
                f"row_fractions names unknown objectives {sorted(unknown)}; known: {list(self.objectives)}"
            )
        if fractions and self.mode != "joint":
            raise ValueError(
                "row_fractions needs mode: joint (in sampled mode each batch is one objective's)"
            )
        for name, share in fractions.items():
            if not 0.0 < share <= 1.0:
                raise ValueError(f"row_fractions[{name!r}] must be in (0, 1], got {share}")
            if share < 1.0 and self.objectives[name].reads_global_rows:
                raise ValueError(
                    f"row_fractions[{name!r}]: {name} is scored over the global batch and reads every row"
                )
        return {name: float(share) for name, share in fractions.items()}

    def rows_of(self, name: str, batch_size: int) -> int:
        """How many of a rank's `batch_size` rows objective `name` reads in a joint step (at least one)."""
        return max(1, math.ceil(self.row_fractions.get(name, 1.0) * batch_size))

    @property
    def objective_names(self) -> list[str]:
        return list(self.objectives)

    def _attach_trainer(self, trainer: Trainer | None) -> None:
        """Lightning hands its trainer to direct LightningModule children only; the objectives sit in a
        ModuleDict, so the runner shares its own: an objective reads the step (`current_step`) from it.
        Objectives still never log (see `vlp.tasks.base`): the runner does."""
        LightningModule.trainer.fset(self, trainer)
        for objective in self.objectives.values():
            objective.trainer = trainer

    trainer = property(LightningModule.trainer.fget, _attach_trainer)

    def setup(self, stage: str) -> None:
        """Loads `init_from` before the strategy shards the model and before a resumed checkpoint."""
        if self.init_from is not None and self.init_report is None:
            report = load_pretrained(self, read_weights(self.init_from), self.init_from)
            if self.backbone.momentum is not None:
                self.backbone.momentum.sync()
            rank_zero_info(report.summary(self.init_from))
            self.init_report = report

    def step_plan(self) -> StepPlan | None:
        """What the sampler chose for this step: the `step_plan` of the trainer's data module (None without
        one, e.g. a plain DataLoader: then joint mode weights every objective 1)."""
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        return getattr(datamodule, "step_plan", None)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | dict[str, Any]:
        return self.train_on(batch, self.step_plan())

    def train_on(self, batch: dict, plan: StepPlan | None) -> Tensor | dict[str, Any]:
        """One training step on `batch` (sample data only) as `plan` says: its objective in sampled mode,
        the objectives' weights in joint mode."""
        readers = sum(objective.reads_global_rows for objective in self.objectives.values())
        features = FeatureCache(self.backbone, batch, share_global_rows=self.mode == "joint" and readers > 1)
        batch_size = batch_size_of(batch)
        if self.mode == "sampled":
            name = plan.objective if plan is not None else None
            if name not in self.objectives:
                raise KeyError(
                    f"the step serves objective {name!r} (from the data module's sampler); this module runs "
                    f"{self.objective_names}"
                )
            out = self.objectives[name].forward_loss(batch, features)
            self.log_objective("train", name, out.logs, batch_size)
            return out.loss
        probabilities = plan.probabilities if plan is not None else {}
        total = torch.zeros((), device=batch["image"].device)
        losses = {}
        for name, objective in self.objectives.items():
            rows = self.rows_of(name, batch_size)
            out = objective.forward_loss(first_rows(batch, rows), features.first_rows(rows))
            self.log_objective("train", name, out.logs, rows)
            share = len(self.objectives) * probabilities[name] if name in probabilities else 1.0
            total = total + self.loss_weights[name] * share * out.loss
            losses[name] = out.loss.detach()
        self.log("train/loss", total.detach(), batch_size=batch_size, prog_bar=True)
        return {"loss": total, "objective_losses": losses}

    def _evaluate(self, stage: str, batch: dict) -> None:
        features = FeatureCache(self.backbone, batch)
        for name, objective in self.objectives.items():
            self.log_objective(
                stage, name, objective.validation_update(batch, features), batch_size_of(batch)
            )

    def _scores(self) -> dict[str, float]:
        scores: dict[str, float] = {}
        with outside_step(self, self.attached_strategy):  # re-ranking calls the network
            for objective in self.objectives.values():
                scores.update(objective.validation_scores())
        return scores

    def validation_step(self, batch: dict, batch_idx: int) -> dict[str, Any] | None:
        self._evaluate("val", batch)
        return self.requested_pictures(batch)

    def on_validation_epoch_end(self) -> None:
        self.log_scores(self._scores())

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate("test", batch)

    def on_test_epoch_end(self) -> None:
        self.log_test_scores(self._scores())

    def predict_step(self, batch: dict, batch_idx: int) -> Any:
        features = FeatureCache(self.backbone, batch)
        out: dict[str, Any] = {"image_id": batch["image_id"]}
        for objective in self.objectives.values():
            out.update(objective.predict(batch, features))
        return out

    def pictures(self, batch: dict) -> dict[str, Tensor]:
        features = FeatureCache(self.backbone, batch)
        images: dict[str, Tensor] = {}
        for objective in self.objectives.values():
            images.update(objective.validation_images(batch, features))
        return images
