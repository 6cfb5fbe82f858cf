"""The `vlp` command end to end on the tiny config: training, TensorBoard tags, metrics.json, validate,
exact resume, and clear errors for bad configs."""

import json
import re
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vlp.cli import run as main

CONFIG = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")
MOMENTUM = str(Path(__file__).parents[1] / "configs" / "momentum.yaml")


def fit(tmp_path: Path, *extra: str):
    return main(["fit", "--config", CONFIG, "--trainer.default_root_dir", str(tmp_path), *extra])


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_fit_logs_per_objective_tags_and_writes_metrics(in_tmp, capsys):
    cli = fit(in_tmp)
    run = Path(cli.trainer.log_dir).resolve()
    assert run == in_tmp / "runs" / "default" / "version_0"
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("itc", "itm", "mlm"):
        assert (
            f"train/{name}/loss" in tags and f"val/{name}/loss" in tags and f"train/sampler/p_{name}" in tags
        )
    assert {
        "val/retrieval/t2i_r1",
        "val/itm/acc",
        "val/mlm/acc",
        "perf/samples_per_s",
        "lr-AdamW/pg1",
    } <= tags
    assert {"perf/gflops_per_sample", "perf/tokens_kept", "perf/token_blocks_kept"} <= tags
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val/retrieval/i2t_r1", "val/retrieval/t2i_r10", "val/itm/acc", "val/mlm/acc"} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    out = capsys.readouterr().out
    assert "val/retrieval/t2i_r1" in out and str(run / "metrics.json") in out


def test_fit_without_a_logger_trains_and_writes_its_metrics(in_tmp):
    """`--trainer.logger false` drops the learning-rate monitor (it would stop the run: no logger)."""
    cli = fit(in_tmp, "--trainer.logger", "false")
    assert cli.trainer.loggers == [] and cli.trainer.global_step > 0
    assert not any(type(c).__name__ == "LearningRateMonitor" for c in cli.trainer.callbacks)
    metrics = json.loads((in_tmp / "metrics.json").read_text())
    assert {"val/itm/acc", "val/mlm/acc"} <= set(metrics)
    assert not (in_tmp / "runs").exists()


def test_validate_from_checkpoint_reproduces_the_scores(in_tmp):
    run = Path(fit(in_tmp).trainer.log_dir)
    trained = json.loads((run / "metrics.json").read_text())
    cli = main(["validate", "--config", CONFIG, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    again = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    assert Path(cli.trainer.log_dir) != run
    for key in ("val/retrieval/i2t_r1", "val/retrieval/t2i_r5", "val/itm/acc", "val/mlm/acc", "val/itc/loss"):
        assert again[key] == pytest.approx(trained[key], abs=1e-6), key


@pytest.mark.parametrize("mode", ["sampled", "joint"])
def test_resume_mid_epoch_matches_an_uninterrupted_run(in_tmp, mode):
    """6 steps straight vs resuming from that run's step-3 checkpoint: identical weights (adaptive sampler)."""
    args = [
        "--data.sampler.strategy",
        "vlp.platform.sampler.Adaptive",
        "--data.sampler.strategy.warmup_observations",
        "1",
        "--model.init_args.mode",
        mode,
    ]
    straight = fit(in_tmp / "a", *args, "--checkpoint.save_top_k", "-1")
    ckpt = Path(straight.trainer.log_dir) / "checkpoints" / "step=3.ckpt"
    resumed = fit(in_tmp / "b", "--ckpt_path", str(ckpt), *args)
    assert resumed.trainer.global_step == 6
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)


def test_resume_with_momentum_model_and_queue_matches_an_uninterrupted_run(in_tmp):
    """The EMA weights, the ITC queue and its pointer continue exactly (LAVIS lost them on resume)."""
    args = ["--config", MOMENTUM, "--model.init_args.mode", "joint"]
    straight = fit(in_tmp / "a", *args, "--checkpoint.save_top_k", "-1")
    ckpt = Path(straight.trainer.log_dir) / "checkpoints" / "step=3.ckpt"
    stored = torch.load(ckpt, weights_only=True)["state_dict"]
    assert (
        int(stored["objectives.itc.queue.filled"]) == 20 and int(stored["objectives.itc.queue.pointer"]) == 4
    )
    resumed = fit(in_tmp / "b", "--ckpt_path", str(ckpt), *args)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    momentum = [key for key in a if ".momentum." in key or ".queue." in key]
    assert len(momentum) > 30
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)
    online = straight.model.backbone.text_proj.weight
    assert not torch.equal(straight.model.backbone.momentum.backbone.text_proj.weight, online)  # it lags


def test_print_config_shows_the_whole_config(in_tmp, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", CONFIG, "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "vlp.tasks.multitask.MultiTaskModule" in out and "embed_dim: 16" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.init_args.not_a_key", "1"], "not_a_key"),
        (["--trainer.max_steps", "many"], "max_steps"),
        (["--data.sources.shapes.init_args.batch_size", "x"], "batch_size"),
    ],
)
def test_bad_config_fails_before_training_naming_the_key(in_tmp, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", CONFIG, *args])
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err
    assert not (in_tmp / "runs").exists()


def test_missing_config_file_is_named(in_tmp, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/does-not-exist.yaml"])
    assert "does-not-exist.yaml" in capsys.readouterr().err


def test_missing_pretrained_file_is_named(in_tmp):
    with pytest.raises(
        (FileNotFoundError, ValueError), match="vision.pretrained: no such file: nope.safetensors"
    ):
        main(
            [
                "fit",
                "--config",
                CONFIG,
                "--model.init_args.backbone.init_args.vision.pretrained",
                "nope.safetensors",
            ]
        )


def test_vlp_console_script_exits_zero(in_tmp):
    import subprocess
    import sys

    script = Path(sys.executable).parent / "vlp"
    result = subprocess.run(
        [
            str(script),
            "fit",
            "--config",
            CONFIG,
            "--trainer.max_steps",
            "2",
            "--trainer.val_check_interval",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "metrics.json:" in result.stdout


def test_test_and_predict_subcommands_run_from_a_checkpoint(in_tmp):
    run = Path(fit(in_tmp).trainer.log_dir)
    ckpt = str(run / "checkpoints" / "last.ckpt")
    tested = main(["test", "--config", CONFIG, "--ckpt_path", ckpt])
    metrics = json.loads((Path(tested.trainer.log_dir) / "metrics.json").read_text())
    assert {"test/retrieval/t2i_r1", "test/itm/acc", "test/mlm/acc"} <= set(metrics)
    predicted = main(["predict", "--config", CONFIG, "--ckpt_path", ckpt])
    outputs = predicted.trainer.predict_loop.predictions
    assert outputs and {"image_id", "image_embedding", "text_embedding"} <= set(outputs[0])


def test_help_lists_every_subcommand_without_loading_the_training_stack():
    import subprocess
    import sys

    from vlp.cli import GROUPS, LIGHTNING

    check = (
        "import sys; from vlp.cli import main; main(sys.argv[1:]); assert 'torch' not in sys.modules, 'torch'"
    )
    result = subprocess.run(
        [sys.executable, "-c", check, "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    listed = [
        line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ") and line.split()
    ]
    assert set(LIGHTNING) | set(GROUPS) <= set(listed)
    version = subprocess.run(
        [sys.executable, "-c", check, "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.returncode == 0 and version.stdout.startswith("vlp 0."), version.stderr


def test_a_failed_run_ends_with_the_one_line_that_says_why(in_tmp):
    import subprocess
    import sys

    bad = ["fit", "--config", CONFIG, "--model.init_args.loss_weights", '{"nope": 1.0}']
    result = subprocess.run(
        [str(Path(sys.executable).parent / "vlp"), *bad], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("vlp fit failed: ValueError: loss_weights names unknown objectives ['nope']"), last


@pytest.mark.slow
def test_a_failed_two_rank_run_also_ends_with_the_line_that_says_why(in_tmp):
    import subprocess
    import sys

    bad = ["fit", "--config", CONFIG, "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--data.sources.shapes.init_args.num_train", "12"]  # fmt: skip
    result = subprocess.run(
        [str(Path(sys.executable).parent / "vlp"), *bad], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(
        r"vlp fit failed( \(rank 1\))?: ValueError: source 'shapes': 12 train items are fewer than one batch \(8\) per rank",
        last,
    ), last
