import csv

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import CSVLogger
from quiet_trainer import quiet_trainer
from torch.utils.data import DataLoader

from vlp.platform.run.callbacks import (
    NonFiniteLossError,
    NonFiniteLossGuard,
    RandomStateCheckpoint,
    ResumeWithConfiguredOptimizer,
    ThroughputMonitor,
)


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
    trainer = quiet_trainer(max_steps=steps, callbacks=[guard])
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


class NaNOnBatches(NaNOnSteps):
    """NaN on chosen batch indices only (micro-batches under gradient accumulation)."""

    def training_step(self, batch, batch_idx):
        self.weights_seen.append(self.layer.weight.detach().clone())
        loss = self.layer(batch).pow(2).mean()
        return loss * float("nan") if batch_idx in self.bad_steps else loss


def test_one_nonfinite_micro_batch_skips_its_accumulated_step():
    module = NaNOnBatches(bad_steps={2})  # batches 2 and 3 make step 1
    guard = NonFiniteLossGuard(max_consecutive=3)
    quiet_trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[guard]).fit(
        module, DataLoader(torch.randn(64, 2), batch_size=4)
    )
    seen = module.weights_seen  # one entry per micro-batch: steps start at batches 0, 2, 4
    assert guard.skipped == 1 and guard.consecutive == 0
    assert not torch.equal(seen[2], seen[0])  # step 0 trained
    torch.testing.assert_close(seen[4], seen[2])  # step 1 skipped, though its batch 3 was finite
    assert not torch.equal(module.layer.weight.detach(), seen[4])  # step 2 trained again


def test_the_ranks_decide_once_per_optimizer_step_after_every_backward():
    """The cross-rank decision is one collective per optimizer step, after the gradients exist: none before
    a backward, where it would make the ranks wait for each other an extra time."""
    events: list[str] = []

    class Recorded(NaNOnBatches):
        def on_after_backward(self):
            events.append("backward")

    trainer = quiet_trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[NonFiniteLossGuard()])
    decide = trainer.strategy.reduce_boolean_decision

    def recorded_decision(decision, all=True):
        events.append(f"decide {decision} all={all}")
        return decide(decision, all=all)

    trainer.strategy.reduce_boolean_decision = recorded_decision
    trainer.fit(Recorded(bad_steps={1}), DataLoader(torch.randn(64, 2), batch_size=4))
    assert events == [
        "backward",
        "backward",
        "decide True all=False",
        "backward",
        "backward",
        "decide False all=False",
    ]


class ImageBatches(LightningModule):
    """A linear model on dict batches with an `image`, as the monitors expect."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch["image"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_monitors_log_only_on_the_steps_the_logger_writes(tmp_path):
    module = ImageBatches()
    calls: list[str] = []
    log = module.log
    module.log = lambda key, *args, **kwargs: (calls.append(key), log(key, *args, **kwargs))
    quiet_trainer(
        max_steps=6,
        log_every_n_steps=2,
        callbacks=[ThroughputMonitor(window=3)],
        logger=CSVLogger(tmp_path, name="run"),
    ).fit(module, DataLoader([{"image": torch.randn(4, 2)} for _ in range(6)], batch_size=None))
    assert calls == ["perf/samples_per_s"] * 3  # steps 2, 4 and 6 of 6, not every step
    with open(tmp_path / "run/version_0/metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["perf/samples_per_s"]]
    assert [int(row["step"]) for row in rows] == [1, 3, 5]
    assert all(float(row["perf/samples_per_s"]) > 0 for row in rows)


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


def restored_trainer(scheduler_class, checkpoint_lr: float, configured_lr: float):
    """A trainer as `ResumeWithConfiguredOptimizer` sees it: optimizer and scheduler built with
    `configured_lr`, then (between its two hooks) restored from a checkpoint trained with `checkpoint_lr`."""
    from types import SimpleNamespace

    def build(lr: float):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr, weight_decay=0.05)
        if scheduler_class is torch.optim.lr_scheduler.LambdaLR:
            scheduler = scheduler_class(optimizer, lambda step: 1.0 / (1 + step))
        else:
            scheduler = scheduler_class(optimizer, step_size=2)
        return optimizer, scheduler

    old_optimizer, old_scheduler = build(checkpoint_lr)
    for _ in range(3):
        old_optimizer.step()
        old_scheduler.step()
    optimizer, scheduler = build(configured_lr)
    trainer = SimpleNamespace(
        optimizers=[optimizer],
        lr_scheduler_configs=[SimpleNamespace(scheduler=scheduler)],
        ckpt_path="x.ckpt",
    )
    callback = ResumeWithConfiguredOptimizer()
    callback.on_fit_start(trainer, None)
    optimizer.load_state_dict(old_optimizer.state_dict())
    scheduler.load_state_dict(old_scheduler.state_dict())
    return callback, trainer


@pytest.mark.parametrize(
    ("checkpoint_lr", "configured_lr"), [(1e-3, 1e-3), (1e-3, 2e-3), (1e-3, 1e-4), (0.5, 0.25)]
)
def test_a_resumed_lambda_schedule_takes_the_new_base_rate_at_its_restored_step(checkpoint_lr, configured_lr):
    callback, trainer = restored_trainer(torch.optim.lr_scheduler.LambdaLR, checkpoint_lr, configured_lr)
    callback.on_train_start(trainer, None)
    group = trainer.optimizers[0].param_groups[0]
    assert group["initial_lr"] == configured_lr and group["lr"] == pytest.approx(configured_lr / 4)
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr() == [group["lr"]]


@pytest.mark.parametrize("configured_lr", [2e-3, 1e-4])
def test_a_schedule_that_cannot_take_a_new_rate_is_refused_naming_the_key(configured_lr):
    callback, trainer = restored_trainer(torch.optim.lr_scheduler.StepLR, 1e-3, configured_lr)
    with pytest.raises(
        ValueError, match=r"resume: the learning rate changed \(optim.lr: \[0.001\] in the checkpoint"
    ):
        callback.on_train_start(trainer, None)


def test_an_unchanged_rate_passes_any_schedule():
    callback, trainer = restored_trainer(torch.optim.lr_scheduler.StepLR, 1e-3, 1e-3)
    callback.on_train_start(trainer, None)
    assert trainer.optimizers[0].param_groups[0]["initial_lr"] == 1e-3
