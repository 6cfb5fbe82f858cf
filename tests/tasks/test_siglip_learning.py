"""A short CPU run of ITC with SigLIP's sigmoid loss through the real entry point lifts retrieval far above
chance (tests/configs/siglip-learning.yaml; the comparison with InfoNCE at the same steps and batch is in
benchmarks/results/2026-12-04-epyc-2cpu-siglip.md)."""

import json
from pathlib import Path

import pytest
import torch

from vlp.cli import run as main

CONFIG = str(Path(__file__).parents[1] / "configs" / "siglip-learning.yaml")
NUM_VAL = 100  # data.sources.shapes.init_args.num_val in the config


@pytest.mark.slow
def test_sigmoid_itc_lifts_retrieval_far_above_chance(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli = main(["fit", "--config", CONFIG, "--trainer.default_root_dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    print(f"t2i R@1 {metrics['val/retrieval/t2i_r1']:.2f}, i2t R@1 {metrics['val/retrieval/i2t_r1']:.2f}")
    for direction in ("t2i", "i2t"):
        assert metrics[f"val/retrieval/{direction}_r1"] >= 10 / NUM_VAL  # 10x chance
    assert cli.model.backbone.logit_bias.item() != -10.0  # the bias is learned
