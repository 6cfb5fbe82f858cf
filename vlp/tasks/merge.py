"""Token-merging distillation: the merged backbone learns to compute what the full-token one computes.

Two forwards of the SAME backbone on each batch: the full one (no merging, under `torch.no_grad`, the
target) and the merged one (`vision_r` = r under the backbone's schedule, plus constant `fusion_r` / `text_r`),
through which alone the gradients flow. Loss, on L2-normalised vectors (each term is 2 - 2 cos):
    L = mean_b || e_merged - e_full ||^2 + mean_(b, real t) || f_merged,t - f_full,t ||^2
with e the ITC image embedding and f_t the fused output of each real caption token ([CLS] included: ITM
reads the fused [CLS], MLM reads the tokens one by one); the text tower never merges, so the ITC text
embedding is the same on both sides. r rises linearly from `r_start` to `r_end` over
`ramp_steps` training steps (ToMe trains with merging on; a ramp lets the weights follow it). At r = 0
(and no fusion merging) both forwards are bitwise equal and the loss is exactly 0.

The step: `global_step` of the runner's trainer (its own alone; `MultiTaskModule` shares its trainer with
the objectives it holds).
Validation scores the merged forward at `r_end`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp.platform.model.backbone import FeatureCache, FusionBackbone
from vlp.platform.model.token_merging import MERGING_OFF
from vlp.platform.optim import OptimConfig
from vlp.tasks.base import Objective, ObjectiveOutput


def normalised_squared_distance(x: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of || x/|x| - t/|t| ||^2 = 2 - 2 cos(x, t) over the rows of x, target [..., D] (where `mask`
    [...] is true). Exactly 0 when x equals target."""
    distance = (F.normalize(x, dim=-1) - F.normalize(target, dim=-1)).pow(2).sum(dim=-1)
    if mask is None:
        return distance.mean()
    weight = mask.to(distance.dtype)
    return (distance * weight).sum() / weight.sum()


class MergeObjective(Objective):
    """Distils the unmerged backbone into its merged self, with a schedule that raises r."""

    name = "merge"

    def __init__(
        self,
        backbone: FusionBackbone,
        optim: OptimConfig | None = None,
        r_start: int = 0,
        r_end: int = 16,
        ramp_steps: int = 1000,
        fusion_r: int = 0,
        text_r: int = 0,
    ) -> None:
        super().__init__(backbone, optim)
        for arg, value in (
            ("r_start", r_start),
            ("r_end", r_end),
            ("fusion_r", fusion_r),
            ("text_r", text_r),
        ):
            if value < 0:
                raise ValueError(f"{arg} must be >= 0, got {value}")
        if ramp_steps < 0:
            raise ValueError(f"ramp_steps must be >= 0, got {ramp_steps}")
        self.r_start, self.r_end, self.ramp_steps = r_start, r_end, ramp_steps
        self.fusion_r, self.text_r = fusion_r, text_r

    def merge_r(self, step: int) -> int:
        """Tokens merged per ViT block at training step `step`: r_start -> r_end linearly, then r_end."""
        progress = 1.0 if self.ramp_steps == 0 else min(max(step, 0) / self.ramp_steps, 1.0)
        return round(self.r_start + (self.r_end - self.r_start) * progress)

    def current_step(self) -> int:
        """The runner's step; unlike the others, this objective refuses to guess 0 outside a trainer (its r
        schedule would silently stay at r_start)."""
        if self._trainer is None:
            raise ValueError(
                "merge: no training step (global_step) to schedule r with; run under a Trainer, alone or "
                "inside MultiTaskModule (which shares its trainer with its objectives)"
            )
        return self.global_step

    def distill(self, batch: dict, features: FeatureCache, r: int) -> ObjectiveOutput:
        text, backbone = features.text, self.backbone
        with torch.no_grad(), backbone.merging_override(**MERGING_OFF):
            full_image = backbone.encode_image(batch["image"])
            full_fused = backbone.fuse(full_image, text.tokens, text.attention_mask)
        with backbone.merging_override(vision_r=r, fusion_r=self.fusion_r, text_r=self.text_r):
            image = backbone.encode_image(batch["image"])
            fused = backbone.fuse(image, text.tokens, text.attention_mask)
        itc = normalised_squared_distance(image.embedding, full_image.embedding)
        fused = normalised_squared_distance(fused, full_fused, text.attention_mask.bool())
        loss = itc + fused
        logs = {"loss": loss, "itc_distance": itc, "fused_distance": fused, "r": torch.tensor(float(r))}
        return ObjectiveOutput(loss, logs)

    def forward_loss(self, batch: dict, features: FeatureCache) -> ObjectiveOutput:
        return self.distill(batch, features, self.merge_r(self.current_step()))

    def validation_update(self, batch: dict, features: FeatureCache) -> dict[str, Tensor]:
        return self.distill(batch, features, self.r_end).logs
