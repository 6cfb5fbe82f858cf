import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader

from vlp.platform.callbacks import NonFiniteLossError, NonFiniteLossGuard, RandomStateCheckpoint


class NaNOnSteps(LightningModule):
    """A linear model whose loss is NaN on chosen steps."""

    def __init__(self, bad_steps: set[int]):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.bad_steps = bad_steps
        self.weights_seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.weights_seen.append(self.layer.weight.detach().clone())
        loss = self.layer(batch).pow(2).mean()
        return (
            loss * float("nan") if self.global_step in self.bad_steps or batch_idx in self.bad_steps else loss
        )

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.1)


def run(module, guard, steps):
    trainer = Trainer(
        max_steps=steps,
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, DataLoader(torch.randn(64, 2), batch_size=4))
    return trainer


def test_nonfinite_steps_are_skipped_and_counted():
    module = NaNOnSteps(bad_steps={2, 3})
    guard = NonFiniteLossGuard(max_consecutive=3)
    run(module, guard, steps=6)
    assert guard.skipped == 2 and guard.consecutive == 0
    seen = module.weights_seen
    torch.testing.assert_close(seen[3], seen[2])  # batch 2 was skipped: no update
    torch.testing.assert_close(seen[4], seen[3])  # batch 3 too
    assert not torch.equal(seen[5], seen[4])  # batch 4 trained again
    assert all(torch.isfinite(w).all() for w in seen)


def test_training_stops_after_too_many_in_a_row():
    module = NaNOnSteps(bad_steps=set(range(1, 100)))
    with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row.*max_consecutive=3"):
        run(module, NonFiniteLossGuard(max_consecutive=3), steps=10)


def test_guard_rejects_a_nonpositive_limit():
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteLossGuard(max_consecutive=0)


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    import random

    import numpy as np

    callback = RandomStateCheckpoint()
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save(callback.state_dict(), tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    callback.load_state_dict(torch.load(tmp_path / "rng.pt", weights_only=True))
    callback.on_train_start(None, None)
    got = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(got[0], expected[0])
    assert (got[1] == expected[1]).all() and got[2] == expected[2]
