"""BLIP (`BlipBackbone`: its unimodal pass and its decoder read the fusion layers through their entry points)
trains on 2 CPU ranks under FSDP2 with every parameter sharded and follows the DDP run's losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two 2-rank runs

REPO = Path(__file__).parents[2]
VLP = Path(sys.executable).parent / "vlp"


def fit(out: Path, strategy: str) -> dict[int, list[dict]]:
    out.mkdir(parents=True)
    recorder = {"class_path": "recorder.StepRecorder", "init_args": {"out_dir": str(out / "steps")}}
    command = [
        str(VLP), "fit", "--config", str(REPO / "tests" / "configs" / "blip-tiny.yaml"),
        "--config", str(REPO / "configs" / "strategy" / f"{strategy}.yaml"), "--trainer.devices=2",
        f"--trainer.default_root_dir={out}", f"--trainer.callbacks+={json.dumps(recorder)}",
    ]  # fmt: skip
    path = os.pathsep.join([str(REPO), str(REPO / "tests" / "distributed"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        rank: [json.loads(line) for line in (out / "steps" / f"rank{rank}.jsonl").read_text().splitlines()]
        for rank in (0, 1)
    }


def test_blip_trains_under_fsdp2_sharded_like_ddp(tmp_path):
    ddp, fsdp = fit(tmp_path / "ddp", "ddp"), fit(tmp_path / "fsdp", "fsdp")
    start = fsdp[0][0]
    assert start["dtensor_params"] == start["params"] > 0
    for rank in (0, 1):
        ddp_losses = [r["loss"] for r in ddp[rank] if r["event"] == "step"]
        fsdp_losses = [r["loss"] for r in fsdp[rank] if r["event"] == "step"]
        assert len(ddp_losses) == len(fsdp_losses) == 4
        assert fsdp_losses == pytest.approx(ddp_losses, rel=1e-3, abs=1e-4)
