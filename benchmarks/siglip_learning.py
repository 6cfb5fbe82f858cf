"""SigLIP's sigmoid loss against InfoNCE on the shapes data: ITC alone, same towers, steps, batch and seed, val
t2i / i2t R@1 over 100 images (chance 0.01). Each loss starts at its paper's temperature (InfoNCE 1 / 0.07,
sigmoid 10 with bias -10). Runs the real entry point on tests/configs/siglip-learning.yaml.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/siglip_learning.py --steps 300 1000 --batch 32 16
    python benchmarks/siglip_learning.py --smoke    # every measurement at the smallest sizes, seconds: checks it runs
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch
from harness import add_smoke_flag

from vlp.cli import run as main

CONFIG = Path(__file__).parents[1] / "tests" / "configs" / "siglip-learning.yaml"
TEMPERATURE = {"infonce": 0.07, "sigmoid": 0.1}
# --smoke: a few train / val images (R@5 still defined), so one step and its validation take a second
SMOKE_OVERRIDES = [
    "--data.sources.shapes.init_args.num_train",
    "8",
    "--data.sources.shapes.init_args.num_val",
    "8",
]


def run(
    loss: str, steps: int, batch: int, seed: int, folder: Path, overrides: list[str] | None = None
) -> dict[str, float]:
    """Val metrics of one `vlp fit` of the ITC config with `loss`; `overrides`: more `vlp fit` arguments."""
    cli = main(
        [
            "fit",
            "--config",
            str(CONFIG),
            "--seed_everything",
            str(seed),
            "--trainer.default_root_dir",
            str(folder),
        ]
        + ["--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)]
        + ["--model.init_args.loss", loss]
        + ["--model.init_args.backbone.init_args.init_temperature", str(TEMPERATURE[loss])]
        + ["--data.sources.shapes.init_args.batch_size", str(batch)]
        + ["--trainer.logger.init_args.save_dir", str(folder), "--trainer.logger.init_args.name", "siglip"]
        + (overrides or [])
    )
    return json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())


def main_() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, nargs="+", default=[300])
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    add_smoke_flag(parser)
    args = parser.parse_args()
    overrides = None
    if args.smoke:  # both losses, one step of batch 4, validated on 8 images
        args.steps, args.batch, args.seeds, overrides = [1], [4], [0], SMOKE_OVERRIDES
    torch.set_num_threads(1)
    print("| steps | batch | seed | loss | t2i R@1 | i2t R@1 | t2i R@5 |")
    print("|---|---|---|---|---|---|---|")
    for steps in args.steps:
        for batch in args.batch:
            for seed in args.seeds:
                for loss in ("infonce", "sigmoid"):
                    with tempfile.TemporaryDirectory() as folder:
                        m = run(loss, steps, batch, seed, Path(folder), overrides)
                    print(
                        f"| {steps} | {batch} | {seed} | {loss} | {m['val/retrieval/t2i_r1']:.2f} | "
                        f"{m['val/retrieval/i2t_r1']:.2f} | {m['val/retrieval/t2i_r5']:.2f} |",
                        flush=True,
                    )
    if args.smoke:
        print("smoke run: one step, the numbers mean nothing")


if __name__ == "__main__":
    main_()
