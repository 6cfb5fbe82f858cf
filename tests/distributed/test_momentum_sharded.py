"""The momentum (EMA) model under FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU ranks, through `vlp fit` with
the momentum overlay (EMA decay 0.9, an ITC queue, ITC and MLM distillation).

Proves, per strategy: the momentum copy is stored like the backbone (FSDP2 and ZeRO-3: each rank holds half
of it, in the same pieces as the online parameters); after every optimizer step, what each rank holds of
the copy follows the EMA formula applied to what it holds of the online model; momentum weights and the
queue are in the sharded checkpoints: a run resumed from step 3 gives the uninterrupted run's losses,
momentum weights and queue at every later step, exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # minutes of training or many processes: `make test-fast` skips it

REPO = Path(__file__).parents[2]
CONFIGS = REPO / "tests" / "configs"
VLP = Path(sys.executable).parent / "vlp"
DECAY = 0.9  # tests/configs/momentum.yaml
STRATEGIES = {
    "fsdp": [],
    "deepspeed_zero2": ["--trainer.precision=32-true"],
    # matrices partitioned, biases and norms kept whole (the tiny model's all stay whole under the 1e5 default)
    "deepspeed_zero3": [
        "--trainer.precision=32-true",
        "--trainer.strategy.init_args.param_persistence_threshold=1000",
    ],
}
SHARDED = {"fsdp", "deepspeed_zero3"}


def _fit(out: Path, strategy: str, *extra: str) -> dict[int, list[dict]]:
    """Train 6 optimizer steps (checkpoints at 3 and 6) on 2 ranks; per rank, per micro-batch the optimizer
    steps taken after it, its loss and the momentum record."""
    out.mkdir(parents=True)
    callbacks = [
        {"class_path": "recorder.StepRecorder", "init_args": {"out_dir": str(out / "steps")}},
        {"class_path": "recorder.MomentumRecorder", "init_args": {"out_dir": str(out / "steps")}},
    ]
    command = [
        str(VLP),
        "fit",
        *("--config", str(CONFIGS / "tiny.yaml"), "--config", str(CONFIGS / "momentum.yaml")),
        *("--config", str(REPO / "configs" / "strategy" / f"{strategy}.yaml")),
        "--trainer.devices=2",
        f"--trainer.default_root_dir={out}",
        "--trainer.limit_val_batches=0",
        "--model.init_args.optim.lr=5e-3",
        "--checkpoint.every_n_train_steps=3",
        "--checkpoint.save_top_k=-1",
        *(f"--trainer.callbacks+={json.dumps(callback)}" for callback in callbacks),
        *STRATEGIES[strategy],
        *extra,
    ]
    path = os.pathsep.join([str(REPO), str(REPO / "tests" / "distributed"), os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        command,
        cwd=out,
        env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    records: dict[int, list[dict]] = {}
    for rank in (0, 1):
        lines = (out / "steps" / f"rank{rank}.jsonl").read_text().splitlines()
        losses = [r["loss"] for r in map(json.loads, lines) if r["event"] == "step"]
        lines = (out / "steps" / f"momentum{rank}.jsonl").read_text().splitlines()
        records[rank] = [{**json.loads(line), "loss": loss} for line, loss in zip(lines, losses, strict=True)]
    return records


def _fit_and_resume(out: Path, strategy: str, *extra: str) -> tuple[dict, dict]:
    """(uninterrupted run, run resumed from its step-3 checkpoint)."""
    full = _fit(out / "full", strategy, *extra)
    checkpoint = out / "full" / "runs" / "default" / "version_0" / "checkpoints" / "step=3.ckpt"
    assert checkpoint.exists()
    return full, _fit(out / "resumed", strategy, *extra, f"--ckpt_path={checkpoint}")


@pytest.fixture(scope="module", params=list(STRATEGIES))
def strategy_runs(request, tmp_path_factory) -> tuple[str, dict, dict]:
    """(strategy, uninterrupted run, resumed run), one micro-batch per step: step -> record."""
    full, resumed = _fit_and_resume(tmp_path_factory.mktemp(request.param), request.param)
    by_step = [{rank: {r["step"]: r for r in run[rank]} for rank in (0, 1)} for run in (full, resumed)]
    return request.param, *by_step


def _assert_ema(before: dict, now: dict, where: object) -> None:
    for name, value in now["momentum"].items():
        expected = DECAY * before["momentum"][name] + (1 - DECAY) * now["online"][name]
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-5), (where, name)


def test_momentum_copy_is_stored_like_the_backbone(strategy_runs):
    strategy, full, _ = strategy_runs
    first = {rank: full[rank][1] for rank in (0, 1)}
    for rank in (0, 1):
        held, whole = first[rank]["held_numel"], first[rank]["full_numel"]
        assert held == {name: first[rank]["online_held_numel"][name] for name in held}
        if strategy in SHARDED:
            assert sum(held.values()) < 0.6 * sum(whole.values())
        else:
            assert held == whole
    if strategy == "deepspeed_zero3":  # both kinds of ZeRO-3 parameter are there, and kept consistent
        for record in (r for rank in (0, 1) for r in full[rank].values()):
            agreement = record["whole_and_partition_agree"]
            assert agreement["agree"] == agreement["whole"] > 0
    if strategy == "fsdp":
        assert first[0]["dtensor"] == [True]
        assert {n: first[0]["held_numel"][n] + first[1]["held_numel"][n] for n in whole} == whole


def test_each_rank_updates_what_it_holds_of_the_copy_by_the_ema_formula(strategy_runs):
    _, full, _ = strategy_runs
    for rank in (0, 1):
        steps = full[rank]
        assert sorted(steps) == [1, 2, 3, 4, 5, 6]
        for step in range(2, 7):
            _assert_ema(steps[step - 1], steps[step], (rank, step))
        assert steps[6]["momentum"] != steps[6]["online"]  # the copy lags the model


def test_resumed_run_continues_losses_momentum_weights_and_queue_exactly(strategy_runs):
    _, full, resumed = strategy_runs
    for rank in (0, 1):
        assert sorted(resumed[rank]) == [4, 5, 6]
        assert full[rank][3]["queue"][2] > 0  # the queue held features when the checkpoint was taken
        for step in (4, 5, 6):
            for key in ("loss", "momentum", "queue"):
                assert resumed[rank][step][key] == full[rank][step][key], (rank, step, key)


def test_zero3_with_accumulation_updates_the_ema_once_per_optimizer_step_and_resumes_exactly(tmp_path):
    """DeepSpeed runs Lightning's optimizer_step on every micro-batch and steps only at the boundary."""
    full, resumed = _fit_and_resume(
        tmp_path, "deepspeed_zero3", "--trainer.accumulate_grad_batches=2", "--trainer.max_steps=5"
    )
    for rank in (0, 1):
        records = full[rank]
        assert [r["step"] for r in records] == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
        for step in range(2, 6):  # micro-batches 2 step - 2 and 2 step - 1 make optimizer step `step`
            previous, first, last = records[2 * step - 3], records[2 * step - 2], records[2 * step - 1]
            assert first["momentum"] == previous["momentum"]  # no EMA update inside an optimizer step
            _assert_ema(previous, last, (rank, step))
        assert [r["loss"] for r in resumed[rank]] == [r["loss"] for r in records[6:]]
        assert resumed[rank][-1]["momentum"] == records[-1]["momentum"]
