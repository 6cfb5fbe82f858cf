"""Gradient accumulation (`trainer.accumulate_grad_batches`): a step is one optimizer step of k micro-batches
that all serve the objective the sampler drew for it; the data streams advance per micro-batch, the sampler,
the schedule, the momentum EMA and checkpoints per step. Proves: k micro-batches of b samples equal one
batch of k x b for an objective whose loss is a mean over samples (grounding), and a run with accumulation
resumed from a mid-run checkpoint continues exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from vlp.cli import run

CONFIGS = Path(__file__).parents[1] / "configs"
RECORDER = Path(__file__).parents[1] / "distributed"


def _fit(out: Path, *args: str, config: str = "tiny.yaml") -> tuple[Any, list[dict]]:
    """A `vlp fit` of a tiny config (6 optimizer steps, checkpoints at 3 and 6); the model and, per
    micro-batch, the optimizer steps taken after it, its objective, loss (divided by k) and learning rate."""
    recorder = {"class_path": "recorder.StepRecorder", "init_args": {"out_dir": str(out)}}
    cli = run(
        [
            "fit",
            "--config",
            str(CONFIGS / config),
            *args,
            f"--trainer.default_root_dir={out}",
            "--trainer.limit_val_batches=0",
            "--model.init_args.optim.lr=5e-3",
            "--checkpoint.every_n_train_steps=3",
            "--checkpoint.save_top_k=-1",
            f"--trainer.callbacks+={json.dumps(recorder)}",
        ]
    )
    lines = (out / "rank0.jsonl").read_text().splitlines()
    return cli, [r for r in map(json.loads, lines) if r["event"] == "step"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(RECORDER))
    return tmp_path


def test_two_micro_batches_of_b_equal_one_batch_of_2b_for_a_mean_over_samples_loss(in_tmp):
    batch = "--data.sources.shapes.init_args.batch_size"
    large, one = _fit(in_tmp / "large", f"{batch}=8", config="grounding-tiny.yaml")
    small, micro = _fit(
        in_tmp / "small", f"{batch}=4", "--trainer.accumulate_grad_batches=2", config="grounding-tiny.yaml"
    )
    assert [r["step"] for r in micro] == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    for step, record in enumerate(one):
        first, second = micro[2 * step], micro[2 * step + 1]
        # the grounding loss is a mean over boxes: the two halves' means (each divided by k = 2) add up
        assert first["loss"] + second["loss"] == pytest.approx(record["loss"], abs=1e-6), step
        assert second["lr"] == record["lr"]  # the schedule steps per optimizer step
    assert one[-1]["lr"] < one[0]["lr"]
    weights, accumulated = large.model.state_dict(), small.model.state_dict()
    for name, value in weights.items():
        # an attention key bias shifts every logit of a query alike: its exact gradient is 0, and AdamW
        # scales the rounding noise that stands in for it up to full steps, differently in the two runs
        if "key" in name and name.endswith(".bias"):
            continue
        torch.testing.assert_close(accumulated[name], value, atol=1e-4, rtol=0, msg=name)


def test_accumulating_run_resumed_mid_run_continues_exactly(in_tmp):
    args = ["--config", str(CONFIGS / "momentum.yaml"), "--trainer.accumulate_grad_batches=2"]
    straight, full = _fit(in_tmp / "straight", *args)
    # a step's micro-batches serve one objective; the sampler draws per step (round robin over 3)
    objectives = [r["objective"] for r in full]
    assert objectives == [name for name in ["itc", "itm", "mlm"] * 2 for _ in range(2)]
    checkpoint = Path(straight.trainer.log_dir) / "checkpoints" / "step=3.ckpt"
    loader_state = torch.load(checkpoint, weights_only=True)["loops"]["fit_loop"]["state_dict"]
    assert loader_state["combined_loader"][0]["produced"] == 6  # 3 steps x 2 micro-batches consumed
    resumed, after = _fit(in_tmp / "resumed", *args, f"--ckpt_path={checkpoint}")
    assert after == full[6:]
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert any(".momentum." in key for key in a) and any(".queue." in key for key in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)


def test_an_epoch_must_hold_whole_optimizer_steps(in_tmp):
    with pytest.raises(ValueError, match=r"data.steps_per_epoch \(5\).*accumulate_grad_batches \(2\)"):
        _fit(in_tmp / "odd", "--data.steps_per_epoch=5", "--trainer.accumulate_grad_batches=2")
