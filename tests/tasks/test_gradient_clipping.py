"""Gradient clipping holds under every precision the README documents, with the fused AdamW where it fits."""

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from quiet_trainer import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader

from vlp.platform.optim import OptimConfig
from vlp.tasks.base import TrainableModule

CLIP = 0.05


class SteepLinear(TrainableModule):
    """A linear layer whose loss has gradients far above `CLIP`; records the gradient norm of each AdamW step."""

    def __init__(self) -> None:
        super().__init__(OptimConfig(lr=1e-3, warmup=1))
        self.layer = nn.Linear(8, 4)
        self.stepped_norms: list[float] = []
        self.fused: bool | None = None

    def training_step(self, batch, batch_idx):
        return (100 * self.layer(batch)).float().pow(2).mean()

    def configure_optimizers(self):
        config = super().configure_optimizers()
        optimizer = config["optimizer"]
        self.fused = bool(optimizer.defaults.get("fused"))

        def record(opt, args, kwargs):
            grads = [
                p.grad.float() for group in opt.param_groups for p in group["params"] if p.grad is not None
            ]
            self.stepped_norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

        optimizer.register_step_post_hook(record)  # the gradients it stepped on, clipped
        return config


@pytest.mark.parametrize(
    ("precision", "plugins", "fused"),
    [
        ("32-true", None, True),
        ("bf16-mixed", None, True),  # Lightning's plugin refuses to clip a fused AdamW; vlp clips it
        ("bf16-true", None, True),
        # a loss scaler (started at 1: the steep loss would overflow fp16 at its default scale): AdamW unfused
        (None, [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=1.0))], False),
    ],
)
def test_gradients_are_clipped_under_each_precision(precision, plugins, fused):
    module = SteepLinear()
    kwargs = {"precision": precision} if precision else {"plugins": plugins}
    trainer = quiet_trainer(max_steps=3, gradient_clip_val=CLIP, **kwargs)
    trainer.fit(module, DataLoader(torch.randn(48, 8), batch_size=8))
    assert module.fused is fused
    assert len(module.stepped_norms) == 3
    assert all(norm <= CLIP * 1.01 for norm in module.stepped_norms), module.stepped_norms
