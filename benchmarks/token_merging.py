"""Token merging: FLOPs, CPU time and retrieval quality with and without merging.

Cost, for the merging config's model (the default with configs/overlays/merge.yaml: its objectives in
one joint step, at 64 px / 8 px patches, since the default's 9 patch tokens leave nothing to merge) and the
same config with a ViT-B/16 + BERT-base sized backbone (random weights; ALBEF's split of BERT-base: 6 text
+ 6 fusion layers; the shapes vocabulary), under each merging setting:
- GFLOPs per training sample: one joint multi-task step, forward + backward, counted by FlopCounterMode
  with CPU attention (merging's gather/sort/scatter count 0, hence the times beside them);
- GFLOPs per inference sample: image and text towers plus the fused pass of the pair (ITM scoring);
- CPU time of that step and pass as a speed-up over r=0, measured in this run: settings interleaved round
  by round, best of the rounds, so load from other processes on a shared machine distorts them least.
  One thread by default (--threads): on a busy 2-core machine OpenMP's spin-waiting made 2-thread step
  times swing 5x from one step to the next, while single-thread times held within ~15 %.
Quality: `vlp fit` of the default with configs/overlays/merge.yaml, merging off and on (same objectives,
data, seed and step budget; only the backbone's merging differs), then val retrieval R@1 and samples/s.
The CPU budget is a short fraction of the configs' schedule: early-training numbers.

    python benchmarks/token_merging.py            # ~10 min on 2 CPU cores
    python benchmarks/token_merging.py --quick    # ~1 min smoke version
"""

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from harness import build_from_config, report

from vlp.cli import run as vlp_run
from vlp.platform.model.token_merging import TokenMergingConfig
from vlp.platform.run.flops import count_flops
from vlp.platform.run.perf import training_step_flops
from vlp.tasks.base import TrainableModule

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CONFIG = CONFIGS / "pretrain" / "shapes-tiny.yaml"
OVERLAY = CONFIGS / "overlays" / "merge.yaml"  # the default at 64 px with merging on
SETTINGS = {
    "r0": TokenMergingConfig(),
    "r4": TokenMergingConfig(vision_r=4),
    "r8": TokenMergingConfig(vision_r=8),
    "r16": TokenMergingConfig(vision_r=16),
    "r16dec": TokenMergingConfig(vision_r=16, schedule="decreasing"),
    "r8+fusion16": TokenMergingConfig(vision_r=8, fusion_r=16),
    "r16dec+text8": TokenMergingConfig(vision_r=16, schedule="decreasing", text_r=8),
}
BACKBONE = "--model.init_args.backbone.init_args"
MERGING_OFF = [f"{BACKBONE}.merging={json.dumps(dict(vision_r=0, text_r=0, fusion_r=0))}"]
MODELS = {  # overrides of the default with configs/overlays/merge.yaml (each setting replaces its merging)
    "shapes-tiny-64px": [],
    "vit-b16+bert-base": [
        f"{BACKBONE}.vision={json.dumps(dict(image_size=224, patch_size=16, width=768, depth=12, heads=12))}",
        f"{BACKBONE}.text={json.dumps(dict(width=768, depth=6, heads=12, max_len=64))}",
        f"{BACKBONE}.fusion={json.dumps(dict(depth=6, heads=12))}",
        f"{BACKBONE}.embed_dim=256",
        "--data.sources.shapes.init_args.image_size=224",
    ],
}


def build(config: Path, overrides: list[str]) -> tuple[TrainableModule, dict]:
    """The model of the config with the merging overlay (and CLI-style overrides), and the shapes source's
    collate + dataset."""
    module, data = build_from_config(config, [f"--config={OVERLAY}", *overrides], threads=None)
    return module, data.sources["shapes"]


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cost_rows(model: str, batch_size: int, settings: list[str], rounds: int) -> list[dict]:
    """FLOPs and CPU times (best of `rounds` >= 1, settings interleaved) of the default config's joint
    multi-task step and of inference, for one model size under each merging setting."""
    started = time.perf_counter()
    module, source = build(CONFIG, MODELS[model])
    dataset = source.dataset("train")
    batch = source.collate([dataset[i] for i in range(batch_size)])
    backbone = module.backbone
    module.log = lambda *args, **kwargs: None

    def train_step() -> None:
        out = module.training_step(batch, 0)
        (out["loss"] if isinstance(out, dict) else out).backward()
        module.zero_grad(set_to_none=True)

    @torch.no_grad()
    def inference() -> torch.Tensor:
        image = backbone.encode_image(batch["image"])
        text = backbone.encode_text(batch["input_ids"], batch["attention_mask"])
        return backbone.fuse(image, text.tokens, text.attention_mask)

    rows = {}
    for name in settings:  # counting FLOPs runs each setting once: it doubles as the warm-up
        backbone.set_merging(SETTINGS[name])
        inference()
        rows[name] = {
            "model": model,
            "setting": name,
            "batch": batch_size,
            "tokens_kept": round(backbone.tokens_kept, 3),
            "train_gflops": training_step_flops(module, batch) / batch_size / 1e9,
            "infer_gflops": count_flops(inference) / batch_size / 1e9,
        }
    times = {name: {"train": [], "infer": []} for name in settings}
    for _ in range(rounds):
        for name in settings:
            backbone.set_merging(SETTINGS[name])
            times[name]["train"].append(seconds(train_step))
            times[name]["infer"].append(seconds(inference))
    print(f"{model}: costs measured in {time.perf_counter() - started:.0f} s", flush=True)
    base = rows[settings[0]]
    base_train, base_infer = (min(times[settings[0]][k]) for k in ("train", "infer"))
    for name in settings:
        row = rows[name]
        row["train_flops_ratio"] = row["train_gflops"] / base["train_gflops"]
        row["infer_flops_ratio"] = row["infer_gflops"] / base["infer_gflops"]
        train_s, infer_s = (min(times[name][k]) for k in ("train", "infer"))
        row["train_step_s"], row["train_speedup"] = train_s, base_train / train_s
        row["infer_s"], row["infer_speedup"] = infer_s, base_infer / infer_s
    return list(rows.values())


def fit(
    overrides: list[str], steps: int, batch_size: int, val_batches: int, root: Path
) -> dict[str, float | None]:
    """`vlp fit` of the merging config (with overrides) for `steps` steps, validated once at the end."""
    start = time.perf_counter()
    sys.argv = sys.argv[:1]  # LightningCLI reads them too; the arguments are all here
    cli = vlp_run(
        [
            "fit",
            f"--config={CONFIG}",
            f"--config={OVERLAY}",
            *overrides,
            f"--trainer.max_steps={steps}",
            f"--trainer.val_check_interval={steps}",
            f"--trainer.limit_val_batches={val_batches}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.logger.init_args.save_dir={root}",
            f"--data.sources.shapes.init_args.batch_size={batch_size}",
        ]
    )
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    return {
        "i2t_r1": metrics.get("val/retrieval/i2t_r1"),
        "t2i_r1": metrics.get("val/retrieval/t2i_r1"),
        "itm_acc": metrics.get("val/itm/acc"),
        "mlm_acc": metrics.get("val/mlm/acc"),
        "samples_per_s": metrics.get("perf/samples_per_s"),
        "wall_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~1 minute version")
    parser.add_argument("--train-steps", type=int, default=None, help="steps of each quality run")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for every part")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    every = list(SETTINGS)
    if args.quick:
        rows = cost_rows("shapes-tiny-64px", 16, ["r0", "r16", "r16dec+text8"], rounds=1)
        rows += cost_rows("vit-b16+bert-base", 1, ["r0", "r16dec+text8"], rounds=1)
        steps, batch_size, val_batches = args.train_steps or 5, 16, 1
    else:
        rows = cost_rows("shapes-tiny-64px", 64, every, rounds=3)
        rows += cost_rows("vit-b16+bert-base", 2, every, rounds=2)
        steps, batch_size, val_batches = args.train_steps or 120, 64, 8
    with tempfile.TemporaryDirectory() as root:
        plain, merged = (
            fit(overrides, steps, batch_size, val_batches, Path(root)) for overrides in (MERGING_OFF, [])
        )
    merging = yaml.safe_load(OVERLAY.read_text())["model"]["init_args"]["backbone"]
    summary = {
        "quality_steps": steps,
        "quality_batch": batch_size,
        "quality_merging": merging["init_args"]["merging"],
    }
    for key in ("i2t_r1", "t2i_r1", "itm_acc", "mlm_acc", "samples_per_s", "wall_s"):
        summary[f"{key}_plain"], summary[f"{key}_merged"] = plain[key], merged[key]
    summary["fit_speedup"] = merged["samples_per_s"] / plain["samples_per_s"]
    report("token_merging_quick" if args.quick else "token_merging", rows, summary)


if __name__ == "__main__":
    main()
