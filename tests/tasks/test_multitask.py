import pytest
import torch
from quiet_trainer import quiet_trainer

from vlp.tasks.itc import ITCObjective
from vlp.tasks.itm import ITMObjective
from vlp.tasks.mlm import MLMObjective
from vlp.tasks.multitask import MultiTaskModule

ALL = {"itc": ITCObjective, "itm": ITMObjective, "mlm": MLMObjective}


def count_calls(module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_all_objectives_hold_the_one_backbone_object(backbone):
    module = MultiTaskModule(backbone, ALL)
    assert all(objective.backbone is module.backbone for objective in module.objectives.values())
    unique = {id(p) for p in module.parameters()}
    assert len(unique) == len(list(module.parameters()))  # shared parameters listed once
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in backbone.parameters()) + sum(
        p.numel()
        for o in module.objectives.values()
        for n, p in o.named_parameters()
        if not n.startswith("backbone.")
    )


def test_joint_step_runs_each_encoder_once(backbone, batch):
    module = MultiTaskModule(backbone, ALL, mode="joint")
    vision, text = count_calls(backbone.vision), count_calls(backbone.text)
    module.log = lambda *a, **k: None
    loss = module.training_step(batch, 0)["loss"]
    assert vision[0] == 1
    # one text pass on the caption shared by ITC and ITM, one on MLM's masked caption (a different input)
    assert text[0] == 2
    loss.backward()
    assert backbone.vision.vit.patch_embed.proj.weight.grad is not None


def test_joint_loss_is_the_weighted_sum(backbone, batch):
    module = MultiTaskModule(
        backbone, {"itc": ITCObjective, "itm": ITMObjective}, mode="joint", loss_weights={"itm": 0.5}
    )
    logged = {}
    module.log = lambda key, value, **k: logged.__setitem__(key, value)
    torch.manual_seed(0)
    loss = module.training_step(batch, 0)["loss"]
    torch.testing.assert_close(loss, logged["train/itc/loss"] + 0.5 * logged["train/itm/loss"])


def test_sampled_step_serves_the_tagged_objective(backbone, batch):
    module = MultiTaskModule(backbone, ALL, mode="sampled")
    logged = {}
    module.log = lambda key, value, **k: logged.__setitem__(key, value)
    module.training_step({**batch, "objective": "itm"}, 0)
    assert set(logged) == {"train/itm/loss", "train/itm/acc"}
    with pytest.raises(KeyError, match="caption"):
        module.training_step({**batch, "objective": "caption"}, 0)


def test_bad_configuration_is_a_clear_error(backbone, make_backbone):
    with pytest.raises(ValueError, match="unknown objectives"):
        MultiTaskModule(backbone, ALL, loss_weights={"itx": 1.0})
    with pytest.raises(ValueError, match="at least one"):
        MultiTaskModule(backbone, {})
    other = make_backbone()
    with pytest.raises(ValueError, match="own backbone"):
        MultiTaskModule(backbone, {"itc": lambda _b: ITCObjective(other)})


def test_joint_loss_follows_the_sampler_probabilities(backbone, batch):
    module = MultiTaskModule(
        backbone, {"itc": ITCObjective, "itm": ITMObjective}, mode="joint", loss_weights={"itm": 0.5}
    )
    logged = {}
    module.log = lambda key, value, **k: logged.__setitem__(key, value)
    torch.manual_seed(0)
    out = module.training_step({**batch, "objective_probabilities": {"itc": 0.75, "itm": 0.25}}, 0)
    expected = 2 * 0.75 * logged["train/itc/loss"] + 0.5 * 2 * 0.25 * logged["train/itm/loss"]
    torch.testing.assert_close(out["loss"], expected)
    assert set(out["objective_losses"]) == {"itc", "itm"}


def test_training_logs_losses_every_step_and_other_values_when_the_logger_writes(backbone, shapes):
    """Each `self.log` costs Lightning's bookkeeping, so values other than losses (ITM accuracy) are logged on
    the steps the loggers write and on the last step; the losses every step (progress bar, checkpoints)."""
    module = MultiTaskModule(backbone, {"itc": ITCObjective, "itm": ITMObjective}, mode="joint")
    steps: dict[str, list[int]] = {}
    log = module.log
    module.log = lambda key, *a, **k: (
        steps.setdefault(key, []).append(module.global_step),
        log(key, *a, **k),
    )
    trainer = quiet_trainer(max_steps=5, log_every_n_steps=2, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=shapes.dataloader("train"))
    assert steps["train/itm/loss"] == steps["train/itc/loss"] == steps["train/loss"] == [0, 1, 2, 3, 4]
    assert steps["train/itm/acc"] == steps["train/itc/logit_scale"] == [1, 3, 4]  # steps 2, 4 and the last
    assert trainer.callback_metrics["train/itm/acc"].item() >= 0  # the last step's value is there
