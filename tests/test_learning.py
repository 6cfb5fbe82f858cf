"""A short CPU run through the real entry point learns: retrieval far above chance."""

import json
from pathlib import Path

from vlp.cli import run as main

CONFIG = str(Path(__file__).parent / "configs" / "learning.yaml")
NUM_VAL = 100  # data.sources.shapes.init_args.num_val in the config


def test_short_run_lifts_text_to_image_recall_far_above_chance(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", CONFIG])
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    chance = 1 / NUM_VAL
    print(
        f"t2i R@1 {metrics['val/retrieval/t2i_r1']:.3f} (chance {chance:.3f}), itm acc {metrics['val/itm/acc']:.3f}"
    )
    assert metrics["val/retrieval/t2i_r1"] >= 10 * chance
    assert metrics["val/retrieval/i2t_r1"] >= 10 * chance
