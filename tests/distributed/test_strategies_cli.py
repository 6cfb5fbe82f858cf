"""`vlp fit` on 2 CPU ranks (gloo) under DDP and FSDP2, each rank recording its steps (recorder.py).

Proves: both ranks draw the same objective sequence; sampled mode (parameters unused in a step) runs
under DDP with no setting; FSDP2 shards every parameter (DTensors with local shards) and follows DDP's
loss curve; an FSDP2 run killed with SIGKILL resumes from its sharded checkpoint to the same next losses;
DeepSpeed ZeRO-2 and ZeRO-3 (everything partitioned) train through `vlp fit` like DDP and resume exactly;
FSDP2 CPU offload and DeepSpeed optimizer / parameter offload train like the same strategy without it;
validation scores under 2 ranks (with a padded last batch) equal one process's on the same global batch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlp.cli import run
from vlp.cli.export import main as export_main

pytestmark = pytest.mark.slow  # minutes of training or many processes: `make test-fast` skips it

REPO = Path(__file__).parents[2]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
VLP = Path(sys.executable).parent / "vlp"
# 13 val images: 2 ranks see 7 each, the 14th a marked repeat of the first
COMMON = [
    "--trainer.max_steps=6",
    "--trainer.val_check_interval=6",
    "--model.init_args.optim.lr=5e-3",  # a few steps that teach something, so the scores mean something
    "--trainer.limit_val_batches=1.0",
    "--data.sources.shapes.init_args.num_val=13",
    "--checkpoint.every_n_train_steps=3",
    "--checkpoint.save_top_k=-1",
]
# ZeRO-3 with every parameter partitioned (the tiny model's would all stay whole under the 1e5 default);
# fp32 here so the losses compare with DDP's (the configs' bf16 is exercised by test_deepspeed_bf16...)
ZERO3_EVERYTHING_PARTITIONED = [
    "--trainer.strategy.init_args.param_persistence_threshold=0",
    "--trainer.precision=32-true",
]
SCORES = ["val/retrieval/i2t_r1", "val/retrieval/t2i_r5", "val/itm/acc", "val/mlm/acc"]


def _command(out: Path, strategy: str, *extra: str, pause_after_step: int | None = None) -> list[str]:
    recorder = {"class_path": "recorder.StepRecorder", "init_args": {"out_dir": str(out / "steps")}}
    if pause_after_step is not None:
        recorder["init_args"]["pause_after_step"] = pause_after_step
    return [
        str(VLP),
        "fit",
        "--config",
        str(TINY),
        "--config",
        str(REPO / "configs" / "strategy" / f"{strategy}.yaml"),
        "--trainer.devices=2",
        f"--trainer.default_root_dir={out}",
        *COMMON,
        f"--trainer.callbacks+={json.dumps(recorder)}",
        *extra,
    ]


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(REPO), str(REPO / "tests" / "distributed"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _fit(out: Path, strategy: str, *extra: str) -> dict[int, list[dict]]:
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        _command(out, strategy, *extra),
        cwd=out,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return _records(out)


def _records(out: Path) -> dict[int, list[dict]]:
    return {
        rank: [json.loads(line) for line in (out / "steps" / f"rank{rank}.jsonl").read_text().splitlines()]
        for rank in (0, 1)
    }


def _steps(records: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in records if r["event"] == "step"}


def _checkpoint(out: Path, name: str) -> Path:
    return out / "runs" / "default" / "version_0" / "checkpoints" / name


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, dict[int, list[dict]]]:
    out = tmp_path_factory.mktemp("ddp")
    return out, _fit(out, "ddp")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> tuple[Path, dict[int, list[dict]]]:
    out = tmp_path_factory.mktemp("fsdp")
    return out, _fit(out, "fsdp")


def test_ddp_ranks_draw_one_objective_sequence_and_sampled_mode_needs_no_setting(ddp_run):
    _, records = ddp_run
    sequences = [[step["objective"] for step in _steps(records[rank]).values()] for rank in (0, 1)]
    assert sequences[0] == sequences[1] == ["itc", "itm", "mlm"] * 2
    losses = [[step["loss"] for step in _steps(records[rank]).values()] for rank in (0, 1)]
    assert losses[0] != losses[1]  # each rank trained on its own shard of the data


def test_validation_under_two_ranks_equals_one_process_on_the_same_global_batch(ddp_run, monkeypatch):
    out, _ = ddp_run
    two_ranks = json.loads((out / "runs" / "default" / "version_0" / "metrics.json").read_text())
    monkeypatch.chdir(out)
    cli = run(
        [
            "validate",
            "--config",
            str(TINY),
            "--trainer.limit_val_batches=1.0",
            "--data.sources.shapes.init_args.num_val=13",
            "--data.sources.shapes.init_args.batch_size=16",
            "--ckpt_path",
            str(_checkpoint(out, "last.ckpt")),
        ]
    )
    one_rank = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    for key in SCORES:
        assert one_rank[key] == pytest.approx(two_ranks[key], abs=1e-6), key
    # non-zero, so the equalities above say something (MLM accuracy can still be 0 after 6 steps: its
    # padding rows are covered by tests/distributed/test_eval_padding.py)
    assert one_rank["val/retrieval/t2i_r5"] > 0.0 and one_rank["val/itm/acc"] > 0.0


def test_fsdp2_shards_every_parameter_and_follows_the_ddp_loss_curve(ddp_run, fsdp_run):
    _, ddp = ddp_run
    _, fsdp = fsdp_run
    for rank in (0, 1):
        start = fsdp[rank][0]
        assert start["event"] == "start" and start["dtensor_params"] == start["params"] > 0
        assert start["local_numel"] < 0.6 * start["global_numel"]
        ddp_steps, fsdp_steps = _steps(ddp[rank]), _steps(fsdp[rank])
        assert [s["objective"] for s in fsdp_steps.values()] == [s["objective"] for s in ddp_steps.values()]
        for step, record in fsdp_steps.items():
            assert record["loss"] == pytest.approx(ddp_steps[step]["loss"], abs=1e-5), step
    assert sum(fsdp[r][0]["local_numel"] for r in (0, 1)) == fsdp[0][0]["global_numel"]


def _resumed_losses_equal(resumed: dict[int, list[dict]], full: dict[int, list[dict]], atol: float) -> None:
    for rank in (0, 1):
        after, before = _steps(resumed[rank]), _steps(full[rank])
        assert sorted(after) == [4, 5, 6]
        for step in (4, 5, 6):
            assert after[step]["objective"] == before[step]["objective"]
            assert after[step]["loss"] == pytest.approx(before[step]["loss"], abs=atol), (rank, step)


def test_fsdp2_run_killed_with_sigkill_resumes_from_its_sharded_checkpoint_to_the_same_losses(
    fsdp_run, tmp_path
):
    _, full = fsdp_run
    out = tmp_path / "killed"
    out.mkdir()
    run_ = subprocess.Popen(
        _command(out, "fsdp", pause_after_step=3),
        cwd=out,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        paused = out / "steps" / "rank0.jsonl"
        while not (paused.is_file() and '"paused"' in paused.read_text()):
            assert run_.poll() is None and time.monotonic() < deadline, "the run ended before its pause"
            time.sleep(0.2)
    finally:
        os.killpg(run_.pid, signal.SIGKILL)  # the launcher and its rank-1 child share this session
        run_.wait()
    assert run_.returncode == -signal.SIGKILL
    assert max(_steps(_records(out)[0])) == 3
    checkpoint = _checkpoint(out, "last.ckpt")
    assert checkpoint.is_dir() and (checkpoint / "meta.pt").is_file()  # sharded: one file per rank
    assert len(list(checkpoint.glob("*.distcp"))) == 2
    resumed = _fit(tmp_path / "resumed", "fsdp", f"--ckpt_path={checkpoint}")
    _resumed_losses_equal(resumed, full, atol=1e-6)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory) -> tuple[Path, dict[int, list[dict]]]:
    out = tmp_path_factory.mktemp("zero3")
    return out, _fit(out, "deepspeed_zero3", *ZERO3_EVERYTHING_PARTITIONED)


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory) -> tuple[Path, dict[int, list[dict]]]:
    out = tmp_path_factory.mktemp("zero2")
    return out, _fit(out, "deepspeed_zero2", "--trainer.precision=32-true")


@pytest.mark.parametrize("run_name", ["zero2_run", "zero3_run"])
def test_deepspeed_trains_through_vlp_fit_like_ddp(run_name, request, ddp_run):
    _, ddp = ddp_run
    _, records = request.getfixturevalue(run_name)
    for rank in (0, 1):
        ddp_steps, steps = _steps(ddp[rank]), _steps(records[rank])
        assert [s["objective"] for s in steps.values()] == [s["objective"] for s in ddp_steps.values()]
        # steps 1-2 match closely; from step 3 on they part a little by design: a parameter a sampled
        # step leaves unused has no gradient under DDP (AdamW skips it) but a zero one in ZeRO's flat
        # buffers (AdamW still moves it by its momentum and weight decay)
        for step in (1, 2):
            assert steps[step]["loss"] == pytest.approx(ddp_steps[step]["loss"], abs=1e-4), (rank, step)
        for step in steps:
            assert steps[step]["loss"] == pytest.approx(ddp_steps[step]["loss"], rel=0.05), (rank, step)


def test_deepspeed_zero2_resumes_from_its_checkpoint_folder_to_the_same_losses(zero2_run, tmp_path):
    out, full = zero2_run
    checkpoint = _checkpoint(out, "step=3.ckpt")
    assert (checkpoint / "latest").is_file() and len(list(checkpoint.rglob("*optim_states.pt"))) == 2
    resumed = _fit(
        tmp_path / "resumed", "deepspeed_zero2", "--trainer.precision=32-true", f"--ckpt_path={checkpoint}"
    )
    _resumed_losses_equal(resumed, full, atol=1e-6)


def test_deepspeed_zero3_resumes_its_partitioned_weights_exactly(zero3_run, tmp_path):
    # every step after the resume, not only the first: each objective leaves other parameters without a
    # gradient, which ZeRO-3 stepped with a stale one until strategies.clear_gradient_partitions_after_step
    out, full = zero3_run
    checkpoint = _checkpoint(out, "step=3.ckpt")
    assert (checkpoint / "latest").is_file() and len(list(checkpoint.rglob("*optim_states.pt"))) == 2
    resumed = _fit(
        tmp_path / "resumed", "deepspeed_zero3", *ZERO3_EVERYTHING_PARTITIONED, f"--ckpt_path={checkpoint}"
    )
    _resumed_losses_equal(resumed, full, atol=0.0)


OFFLOADED = {
    "fsdp": ("fsdp_run", ["--trainer.strategy.init_args.cpu_offload=true"]),
    "deepspeed_zero2": (
        "zero2_run",
        ["--trainer.precision=32-true", "--trainer.strategy.init_args.offload_optimizer=true"],
    ),
    "deepspeed_zero3": (
        "zero3_run",
        [
            *ZERO3_EVERYTHING_PARTITIONED,
            "--trainer.strategy.init_args.offload_optimizer=true",
            "--trainer.strategy.init_args.offload_parameters=true",
        ],
    ),
}


@pytest.mark.parametrize("strategy", list(OFFLOADED))
def test_offloaded_runs_train_on_cpu_ranks_like_the_same_strategy_without_offload(
    strategy, request, tmp_path
):
    # FSDP2: sharded parameters, gradients and optimizer state in host memory (not pinned: no GPU);
    # ZeRO-2: optimizer state and step on the host; ZeRO-3: parameters too
    reference, options = OFFLOADED[strategy]
    _, without = request.getfixturevalue(reference)
    offloaded = _fit(tmp_path, strategy, *options, "--checkpoint.every_n_train_steps=0")
    for rank in (0, 1):
        steps, expected = _steps(offloaded[rank]), _steps(without[rank])
        assert sorted(steps) == sorted(expected) == [1, 2, 3, 4, 5, 6]
        for step, record in steps.items():
            assert record["loss"] == pytest.approx(expected[step]["loss"], abs=1e-6), (rank, step)


@pytest.mark.parametrize("run_name", ["ddp_run", "fsdp_run", "zero2_run"])
def test_export_writes_each_trained_parameter_once_under_its_plain_name(run_name, request, tmp_path):
    out, records = request.getfixturevalue(run_name)
    target = tmp_path / "model.safetensors"
    assert export_main([str(_checkpoint(out, "last.ckpt")), str(target)]) == 0
    weights = load_file(target)
    trained = next(r for r in records[0] if r["event"] == "end")["param_sums"]
    plain = {
        name.replace("parametrizations.", "").removesuffix(".original"): s for name, s in trained.items()
    }
    assert set(plain) <= set(weights)
    assert not [key for key in weights if key.startswith("objectives.") and ".backbone." in key]
    assert weights["backbone.log_logit_scale"].shape == ()
    for name, total in plain.items():
        assert weights[name].double().sum().item() == pytest.approx(total, rel=1e-6, abs=1e-6), name


def test_export_names_the_path_when_it_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        export_main([str(tmp_path / "missing.ckpt"), str(tmp_path / "out.safetensors")])
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="neither a torch distributed checkpoint"):
        export_main([str(tmp_path / "folder"), str(tmp_path / "out.safetensors")])
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="no 'state_dict' entry"):
        export_main([str(tmp_path / "plain.pt"), str(tmp_path / "out.pt")])


def test_the_default_on_two_cpu_ranks_trains_every_parameter_each_step(tmp_path):
    """shapes-tiny-2cpu.yaml (what `make train` adds without a GPU) turns DDP's unused-parameter search
    off: a joint step of the default's five objectives must reach every parameter, or DDP fails at the
    second step. Both ranks train on their own shards and validation writes the scores."""
    recorder = {"class_path": "recorder.StepRecorder", "init_args": {"out_dir": str(tmp_path / "steps")}}
    command = [
        str(VLP),
        "fit",
        "--config",
        str(REPO / "configs" / "pretrain" / "shapes-tiny.yaml"),
        "--config",
        str(REPO / "configs" / "pretrain" / "shapes-tiny-2cpu.yaml"),
        "--trainer.max_steps=3",
        "--trainer.val_check_interval=3",
        "--data.sources.shapes.init_args.num_val=16",
        f"--trainer.callbacks+={json.dumps(recorder)}",
    ]
    done = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    records = _records(tmp_path)
    losses = [[step["loss"] for step in _steps(records[rank]).values()] for rank in (0, 1)]
    assert [len(rank_losses) for rank_losses in losses] == [3, 3]
    assert all(torch.isfinite(torch.tensor(rank_losses)).all() for rank_losses in losses)
    assert losses[0] != losses[1]
    (metrics,) = (tmp_path / "runs").glob("*/version_0/metrics.json")
    assert 0.0 <= json.loads(metrics.read_text())["val/itm/acc"] <= 1.0


# vision merging with grounding, whose box head reads the merged image back on its patch grid: the grid's keys
# and values come from the fusion layers' `key_value_terms`, an entry point that sharded runs gather
MERGED_GROUNDING = [
    "--model.init_args.backbone.init_args.merging={vision_r: 4}",
    '--model.init_args.objectives.grounding={"class_path": "vlp.tasks.grounding.GroundingObjective"}',
    "--model.init_args.mode=joint",
    "--trainer.max_steps=3",
    "--trainer.val_check_interval=3",
]


@pytest.fixture(scope="module")
def merged_grounding_ddp_run(tmp_path_factory) -> dict[int, list[dict]]:
    return _fit(tmp_path_factory.mktemp("merged_grounding_ddp"), "ddp", *MERGED_GROUNDING)


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_zero3"])
def test_merged_grounding_reads_the_patch_grid_under_sharding_like_ddp(
    strategy, tmp_path, merged_grounding_ddp_run
):
    ddp = merged_grounding_ddp_run
    extra = ZERO3_EVERYTHING_PARTITIONED if strategy == "deepspeed_zero3" else []
    sharded = _fit(tmp_path / strategy, strategy, *MERGED_GROUNDING, *extra)
    for rank in (0, 1):
        ddp_steps, steps = _steps(ddp[rank]), _steps(sharded[rank])
        assert sorted(steps) == [1, 2, 3]
        for step in steps:
            assert steps[step]["loss"] == pytest.approx(ddp_steps[step]["loss"], abs=1e-4), (rank, step)


# the same with blocks that unmerge: grounding reads every patch's own token (the ViT's final norm applied
# outside its forward), the other objectives the output merged once
UNMERGING_GROUNDING = [
    *MERGED_GROUNDING,
    "--model.init_args.backbone.init_args.merging={vision_r: 8, vision_unmerge: true}",
    "--model.init_args.objectives.grounding.init_args.patch_grid=tokens",
]


def test_unmerging_grounding_reads_every_patch_under_zero3_like_ddp(tmp_path):
    ddp = _fit(tmp_path / "ddp", "ddp", *UNMERGING_GROUNDING)
    sharded = _fit(tmp_path / "zero3", "deepspeed_zero3", *UNMERGING_GROUNDING, *ZERO3_EVERYTHING_PARTITIONED)
    for rank in (0, 1):
        ddp_steps, steps = _steps(ddp[rank]), _steps(sharded[rank])
        assert sorted(steps) == [1, 2, 3]
        for step in steps:
            assert steps[step]["loss"] == pytest.approx(ddp_steps[step]["loss"], abs=1e-4), (rank, step)
