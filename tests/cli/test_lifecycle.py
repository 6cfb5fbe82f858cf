"""The run lifecycle outside Slurm: a final validation when the last step is not one, `--ckpt_path last`
across the experiment's versions, and the step progress bar."""

import json
import logging
import os
import subprocess
from pathlib import Path

import pytest
from tensorboard_scalars import scalars

from vlp.cli import run
from vlp.platform.run.checkpoints import AtomicCheckpointIO, partial_path

CONFIG = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def scalar_steps(run_dir: Path, tag: str) -> list[int]:
    return [step for step, _ in scalars(run_dir)[tag]]


@pytest.mark.parametrize(("max_steps", "validated_at"), [(7, [3, 6, 7]), (6, [3, 6])])
def test_fit_always_ends_with_one_validation(in_tmp, max_steps, validated_at):
    """val_check_interval 3: 7 steps add a validation at step 7; 6 steps end on one and add none.
    (Lightning logs the validation after step s at TensorBoard step s - 1, like that step's losses.)"""
    cli = run(["fit", "--config", CONFIG, "--trainer.max_steps", str(max_steps)])
    folder = Path(cli.trainer.log_dir)
    logged_at = [step - 1 for step in validated_at]
    assert scalar_steps(folder, "val/itc/loss") == logged_at
    assert scalar_steps(folder, "val/retrieval/t2i_r1") == logged_at
    metrics = json.loads((folder / "metrics.json").read_text())
    assert {"val/retrieval/t2i_r1", "val/itm/acc", "val/mlm/acc", "val/itc/loss"} <= set(metrics)
    assert (folder / "checkpoints" / f"step={max_steps}.ckpt").is_file()
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_fit_by_epochs_also_ends_with_a_validation(in_tmp):
    """96 samples in batches of 8: one epoch is 12 steps; validations every 5 steps, then at step 12."""
    args = ["--trainer.max_steps", "-1", "--trainer.max_epochs", "1", "--trainer.val_check_interval", "5"]
    cli = run(["fit", "--config", CONFIG, *args])
    assert cli.trainer.global_step == 12
    assert scalar_steps(Path(cli.trainer.log_dir), "val/itc/loss") == [4, 9, 11]


def test_ckpt_path_last_resumes_the_newest_complete_checkpoint_of_the_experiment(in_tmp):
    first = run(["fit", "--config", CONFIG])
    last = Path(first.trainer.log_dir) / "checkpoints" / "last.ckpt"
    truncated = last.with_name("last-v1.ckpt")  # newer, but cut off mid-write by a killed process
    truncated.write_bytes(last.read_bytes()[:1000])
    resumed = run(["fit", "--config", CONFIG, "--trainer.max_steps", "9", "--ckpt_path", "last"])
    assert Path(resumed.trainer.ckpt_path).resolve() == last.resolve()
    assert Path(resumed.trainer.log_dir).name == "version_1"
    assert resumed.trainer.global_step == 9
    assert scalar_steps(Path(resumed.trainer.log_dir), "val/itc/loss") == [8]


def test_ckpt_path_last_without_any_checkpoint_starts_fresh(in_tmp):
    with pytest.warns(UserWarning, match="no last checkpoint"):
        cli = run(["fit", "--config", CONFIG, "--trainer.max_steps", "2", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 2


def test_progress_bar_counts_steps_of_max_steps_with_objective_losses(in_tmp, capsys):
    run(["fit", "--config", CONFIG, "--trainer.max_steps", "5", "--trainer.enable_progress_bar", "true"])
    out = capsys.readouterr().out
    final = out.split("\r")[-1] if "\r" in out else out
    assert "Steps" in out and "5/5" in out and "Epoch" not in out
    for name in ("itc=", "itm=", "mlm="):
        assert name in out, final
    assert "train/" not in out and "v_num" not in out


# until `vlp.cli` lists StalePartialsCleanup among its default callbacks (a second one is harmless)


@pytest.mark.slow
@pytest.mark.parametrize("max_steps", [6, 7])
def test_a_run_killed_after_its_last_checkpoint_writes_its_scores_when_resumed(in_tmp, capsys, max_steps):
    """Killed after `step=N.ckpt` (while writing `last.ckpt`) and before metrics.json: the resumed fit
    removes the killed save's partial file, trains nothing, validates once and writes the scores the killed
    run would have written (same weights, same validation data)."""
    args = ["fit", "--config", CONFIG, "--trainer.max_steps", str(max_steps)]
    first = run(args)
    folder = Path(first.trainer.log_dir)
    written = json.loads((folder / "metrics.json").read_text())
    (folder / "metrics.json").unlink()
    ended = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True)
    partial = partial_path(folder / "checkpoints" / "last.ckpt")
    partial = partial.with_name(partial.name.replace(f"-{os.getpid()}-", f"-{int(ended.stdout)}-"))
    partial.write_bytes(b"PK" + bytes(1000))
    capsys.readouterr()
    resumed = run([*args, "--ckpt_path", "last"])
    assert not partial.exists()
    assert resumed.trainer.global_step == max_steps
    out = capsys.readouterr().out
    metrics = json.loads((Path(resumed.trainer.log_dir) / "metrics.json").read_text())
    scores = {key: value for key, value in written.items() if key.startswith("val/")}
    assert len(scores) >= 10 and {key: metrics[key] for key in scores} == pytest.approx(scores, abs=1e-6)
    assert "val/retrieval/t2i_r1" in out.split("Scores:")[1]
    assert scalar_steps(Path(resumed.trainer.log_dir), "val/itc/loss") == [max_steps - 1]


@pytest.fixture
def trained_ids(monkeypatch) -> list[list[int]]:
    """The image ids of every training batch the data module hands over, per batch."""
    from vlp.datamodules.multitask import MultiTaskDataModule

    seen: list[list[int]] = []
    original = MultiTaskDataModule.on_before_batch_transfer

    def record(self, batch: dict, dataloader_idx: int) -> dict:
        if "loader_index" in batch:  # a training batch
            seen.append(batch["image_id"].tolist())
        return original(self, batch, dataloader_idx)

    monkeypatch.setattr(MultiTaskDataModule, "on_before_batch_transfer", record)
    return seen


@pytest.mark.parametrize(("before", "after"), [(8, 4), (4, 8), (8, 6), (6, 8), (8, 8)])
def test_a_resume_with_another_batch_size_continues_at_the_next_sample(in_tmp, trained_ids, before, after):
    """3 steps of `before` samples, then steps of `after`: the resumed run reads the epoch's order on from
    sample 3 x `before`, in whole batches, so no sample of the epoch is trained twice or left out
    (up to the tail shorter than a batch, which every epoch drops)."""
    from vlp.datamodules.source import shard_order

    batch_size = "--data.sources.shapes.init_args.batch_size"
    run(["fit", "--config", CONFIG, "--trainer.max_steps", "3", batch_size, str(before)])
    first = [i for batch in trained_ids for i in batch]
    trained_ids.clear()
    steps = (96 - 3 * before) // after  # the rest of the epoch, then one batch of the next
    resumed = run(
        ["fit", "--config", CONFIG, "--trainer.max_steps", str(3 + steps + 1), batch_size, str(after)]
        + ["--ckpt_path", "last"]
    )
    assert resumed.trainer.global_step == 3 + steps + 1
    assert [len(batch) for batch in trained_ids] == [after] * (steps + 1)
    second = [i for batch in trained_ids for i in batch]
    order = shard_order(96, seed=0, epoch=0)
    assert first == order[: 3 * before]
    assert second[: steps * after] == order[3 * before : 3 * before + steps * after]
    assert second[steps * after :] == shard_order(96, seed=0, epoch=1)[:after]


# until `vlp.cli` lists ResumeWithConfiguredOptimizer among its default callbacks (a second one is harmless)
OPTIM = "--model.init_args.optim."


@pytest.mark.parametrize(
    "changed",
    [
        [f"{OPTIM}lr=1e-3"],
        [f"{OPTIM}lr=5e-5"],
        [f"{OPTIM}weight_decay=0.2"],
        [f"{OPTIM}lr=2e-3", f"{OPTIM}beta2=0.95", f"{OPTIM}weight_decay=0.0"],
        [],
    ],
)
def test_a_resume_trains_with_the_configs_optimizer_settings(in_tmp, caplog, changed):
    """3 steps with the defaults, resumed to 5 with `changed`: the optimizer ends exactly as a run that had
    `changed` from the start (learning rate at the same point of the schedule, weight decay, betas)."""
    base = ["fit", "--config", CONFIG, "--trainer.val_check_interval=100", "--trainer.limit_val_batches=0"]
    run([*base, "--trainer.max_steps=3", "--trainer.default_root_dir=a"])
    with caplog.at_level(logging.INFO):
        resumed = run([*base, "--trainer.max_steps=5", *changed, "--ckpt_path", "last"])
    straight = run([*base, "--trainer.max_steps=5", *changed, "--trainer.logger=false"])
    groups = [
        optimizer.param_groups
        for optimizer in (resumed.trainer.optimizers[0], straight.trainer.optimizers[0])
    ]
    for got, want in zip(*groups, strict=True):
        for key in ("lr", "initial_lr", "weight_decay", "betas"):
            assert got[key] == want[key], key
    assert ("the config's optimizer settings replace the checkpoint's" in caplog.text) == bool(changed)
