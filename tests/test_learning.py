"""A short CPU run through the real entry point learns: retrieval, ITM and MLM far above chance."""

import json
from collections import Counter
from pathlib import Path

from vlp.cli import run as main
from vlp.datamodules.shapes import ShapesSource

CONFIG = str(Path(__file__).parent / "configs" / "learning.yaml")
NUM_VAL = 100  # data.sources.shapes.init_args.num_val in the config


def majority_token_accuracy(source: ShapesSource) -> float:
    """MLM accuracy of always guessing the most frequent maskable token of the val captions (its chance)."""
    special = set(source.tokenizer.all_special_ids)
    dataset = source.dataset("val")
    batch = source.collate([dataset[i] for i in range(len(dataset))])
    tokens = [int(t) for t in batch["input_ids"][batch["attention_mask"].bool()] if int(t) not in special]
    return Counter(tokens).most_common(1)[0][1] / len(tokens)


def test_short_run_lifts_retrieval_itm_and_mlm_far_above_chance(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", CONFIG])
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    retrieval_chance = 1 / NUM_VAL
    mlm_chance = majority_token_accuracy(cli.datamodule.sources["shapes"])
    print(
        f"t2i R@1 {metrics['val/retrieval/t2i_r1']:.3f} (chance {retrieval_chance:.3f}), "
        f"itm acc {metrics['val/itm/acc']:.3f} (chance 0.5), "
        f"mlm acc {metrics['val/mlm/acc']:.3f} (majority token {mlm_chance:.3f})"
    )
    assert metrics["val/retrieval/t2i_r1"] >= 10 * retrieval_chance
    assert metrics["val/retrieval/i2t_r1"] >= 10 * retrieval_chance
    assert metrics["val/itm/acc"] >= 0.65  # balanced pairs: chance 0.5
    assert metrics["val/mlm/acc"] >= 2 * mlm_chance
