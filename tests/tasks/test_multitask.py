from types import SimpleNamespace

import pytest
import torch
from quiet_trainer import quiet_trainer
from step_only import at_step

from vlp.platform.model.backbone import FeatureCache, first_rows
from vlp.platform.step_plan import StepPlan
from vlp.tasks.caption import CaptionObjective
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
    module.train_on(batch, StepPlan("itm"))
    assert set(logged) == {"train/itm/loss", "train/itm/acc"}
    with pytest.raises(KeyError, match="caption"):
        module.train_on(batch, StepPlan("caption"))


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
    out = module.train_on(batch, StepPlan("itc", {"itc": 0.75, "itm": 0.25}))
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


def test_first_rows_cut_every_per_row_entry_and_keep_the_rest(batch):
    part = first_rows({**batch, "class_names": ["a", "b"]}, 3)
    assert part["image"].shape[0] == part["input_ids"].shape[0] == part["boxes"].shape[0] == 3
    torch.testing.assert_close(part["phrase_input_ids"], batch["phrase_input_ids"][:3])
    assert part["captions"] == batch["captions"][:3]
    assert part["class_names"] == ["a", "b"]  # not one entry per row
    assert first_rows(batch, 8) is batch
    with pytest.raises(ValueError, match="reference_"):
        first_rows({**batch, "reference_input_ids": batch["input_ids"]}, 3)


def test_row_fractions_give_an_objective_the_first_rows_with_shared_passes(make_backbone, batch):
    """MLM and captioning at half the rows: their losses and every gradient equal each objective run on the
    first 4 rows by itself (its own image pass), beside ITC and ITM on all 8; the image tower runs once."""
    backbone = make_backbone(caption_decoder=True)
    names = {"itc": ITCObjective, "itm": ITMObjective, "mlm": MLMObjective, "caption": CaptionObjective}
    module = MultiTaskModule(backbone, names, mode="joint", row_fractions={"mlm": 0.5, "caption": 0.45})
    assert [module.rows_of(name, 8) for name in names] == [8, 8, 4, 4]  # ceil(0.45 * 8) = 4
    logged = {}
    module.log = lambda key, value, **k: logged.__setitem__(key, value)
    vision = count_calls(backbone.vision)
    torch.manual_seed(0)
    module.training_step(batch, 0)["loss"].backward()
    assert vision[0] == 1
    joint = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    module.zero_grad()
    objectives, whole, half = module.objectives, batch, first_rows(batch, 4)
    torch.manual_seed(0)  # the same draws in the same order: ITM's negatives, then MLM's masks
    itc = objectives["itc"].forward_loss(whole, features := FeatureCache(backbone, whole)).loss
    itm = objectives["itm"].forward_loss(whole, features).loss
    mlm = objectives["mlm"].forward_loss(half, alone := FeatureCache(backbone, half)).loss
    caption = objectives["caption"].forward_loss(half, alone).loss
    (itc + itm + mlm + caption).backward()
    torch.testing.assert_close(logged["train/mlm/loss"], mlm.detach())
    torch.testing.assert_close(logged["train/caption/loss"], caption.detach())
    reference = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert joint.keys() == reference.keys()
    for name, grad in joint.items():
        torch.testing.assert_close(grad, reference[name], atol=1e-5, rtol=1e-4, msg=name)


def test_bad_row_fractions_are_clear_errors(backbone):
    with pytest.raises(ValueError, match="unknown objectives"):
        MultiTaskModule(backbone, ALL, mode="joint", row_fractions={"mlx": 0.5})
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
            MultiTaskModule(backbone, ALL, mode="joint", row_fractions={"mlm": share})
    for name in ("itc", "itm"):
        with pytest.raises(ValueError, match="global batch"):
            MultiTaskModule(backbone, ALL, mode="joint", row_fractions={name: 0.5})
    with pytest.raises(ValueError, match="mode: joint"):
        MultiTaskModule(backbone, ALL, mode="sampled", row_fractions={"mlm": 0.5})
    assert MultiTaskModule(backbone, ALL, mode="joint", row_fractions={"itm": 1.0}).rows_of("itm", 5) == 5


def test_objectives_read_the_step_from_the_runners_trainer(backbone):
    """Nested objectives have no trainer of their own (they sit in a ModuleDict): the runner shares its, so
    `current_step` is the one rule for the step, alone or in the mix; detaching clears it everywhere."""
    module = at_step(MultiTaskModule(backbone, ALL), 7)
    assert [objective.current_step() for objective in module.objectives.values()] == [7, 7, 7]
    module.trainer = None
    assert all(objective._trainer is None for objective in module.objectives.values())
    assert module.objectives["itc"].current_step() == 0


def test_sampled_steps_serve_the_data_modules_plan(backbone, batch):
    """Under a trainer the plan comes from the data module's `step_plan`, never from a batch key."""
    module = at_step(MultiTaskModule(backbone, ALL, mode="sampled"), 0)
    module.trainer.datamodule = SimpleNamespace(
        step_plan=StepPlan("itm", {"itc": 0.2, "itm": 0.4, "mlm": 0.4})
    )
    logged = {}
    module.log = lambda key, value, **k: logged.__setitem__(key, value)
    module.training_step(batch, 0)
    assert set(logged) == {"train/itm/loss", "train/itm/acc"}
