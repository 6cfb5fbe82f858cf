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

REPO = Path(__file__).parents[2]
CONFIGS = REPO / "tests" / "configs"
VLP = Path(sys.executable).parent / "vlp"
DECAY = 0.9  # tests/configs/momentum.yaml
STRATEGIES = {
    "fsdp": [],
    "deepspeed_zero2": ["--trainer.precision=32-true"],
    # every parameter partitioned (the tiny model's would all stay whole under the 1e5 default)
    "deepspeed_zero3": [
        "--trainer.precision=32-true",
        "--trainer.strategy.init_args.param_persistence_threshold=0",
    ],
}
SHARDED = {"fsdp", "deepspeed_zero3"}


def _fit(out: Path, strategy: str, *extra: str) -> dict[int, dict[int, dict]]:
    """Train 6 steps (checkpoints at 3 and 6) on 2 ranks; per rank, step -> losses and momentum records."""
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
    records: dict[int, dict[int, dict]] = {}
    for rank in (0, 1):
        steps = records.setdefault(rank, {})
        for line in (out / "steps" / f"rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record["event"] == "step":
                steps.setdefault(record["step"], {})["loss"] = record["loss"]
        for line in (out / "steps" / f"momentum{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            steps[record["step"]].update(record)
    return records


@pytest.fixture(scope="module", params=list(STRATEGIES))
def strategy_runs(request, tmp_path_factory) -> tuple[str, dict, dict]:
    """(strategy, uninterrupted run, run resumed from the uninterrupted run's step-3 checkpoint)."""
    strategy = request.param
    out = tmp_path_factory.mktemp(strategy)
    full = _fit(out / "full", strategy)
    checkpoint = out / "full" / "runs" / "default" / "version_0" / "checkpoints" / "step=3.ckpt"
    assert checkpoint.exists()
    resumed = _fit(out / "resumed", strategy, f"--ckpt_path={checkpoint}")
    return strategy, full, resumed


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
    if strategy == "fsdp":
        assert first[0]["dtensor"] == [True]
        assert {n: first[0]["held_numel"][n] + first[1]["held_numel"][n] for n in whole} == whole


def test_each_rank_updates_what_it_holds_of_the_copy_by_the_ema_formula(strategy_runs):
    _, full, _ = strategy_runs
    for rank in (0, 1):
        steps = full[rank]
        assert sorted(steps) == [1, 2, 3, 4, 5, 6]
        for step in range(2, 7):
            before, now = steps[step - 1]["momentum"], steps[step]
            for name, value in now["momentum"].items():
                expected = DECAY * before[name] + (1 - DECAY) * now["online"][name]
                assert value == pytest.approx(expected, rel=1e-5, abs=1e-5), (rank, step, name)
        assert steps[6]["momentum"] != steps[6]["online"]  # the copy lags the model


def test_resumed_run_continues_losses_momentum_weights_and_queue_exactly(strategy_runs):
    _, full, resumed = strategy_runs
    for rank in (0, 1):
        assert sorted(resumed[rank]) == [4, 5, 6]
        assert full[rank][3]["queue"][2] > 0  # the queue held features when the checkpoint was taken
        for step in (4, 5, 6):
            for key in ("loss", "momentum", "queue"):
                assert resumed[rank][step][key] == full[rank][step][key], (rank, step, key)
