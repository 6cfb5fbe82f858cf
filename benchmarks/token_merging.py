"""Token merging (and FLIP's patch dropout): FLOPs, CPU time and quality against the unmerged model.

Parts (--parts; costs, goals and quality by default, side by side in one run and one results file):
- costs: the merging config's model (the default with configs/overlays/merge.yaml: its objectives in one
  joint step, 64 px / 8 px patches, since the default's 9 patch tokens leave nothing to merge) and the same
  config with a ViT-B/16 + BERT-base sized backbone (random weights; ALBEF's split of BERT-base: 6 text +
  6 fusion layers; the shapes vocabulary), under each merging setting;
- goals: the issue's cost goals. Merge config: the overlay's merging (and patch dropout 0.5 / 0.75 without
  merging) against neither, batch 64; ViT-B/16 224 px + BERT-base 6 + 6: the joint ITC + ITM + MLM step
  (ALBEF's objectives, all rows) at vision_r 16 against 0, batch 8;
- quality: `vlp fit` of the merge config unmerged, merged (the overlay; `merged_entry40_captions`: its setting
  before, 40 patch tokens merged at entry and each caption in the fusion, `merged_entry40` and `merged_captions`
  each part of that alone; `merged_tome`: ToMe's blocks in the entry merge's place, `vision_r: [32, 16, 8]`, the
  setting before those; `merged_dense`: with configs/overlays/merge-dense.yaml on top, blocks that unmerge;
  `merged_whole`: those blocks with the ViT's output kept whole, `merging.vision_merge_output: false`;
  `merged_whole_lean`: the same at `vision_r: [32, 48, 56]`, within the FLOPs goal; `vit6_unmerged` and
  `vit6_merged_whole`: the same config with a 6-block ViT, unmerged and with the whole output at
  `vision_r: [16, 32, 32, 48, 48, 56]`; `vit6_merged_whole_share` at
  `[24, 40, 48, 48, 56, 56]`, the share of tokens three blocks keep at `[32, 48, 56]`; `vit12_unmerged` and
  `vit12_merged_whole`: a 12-block ViT, the 6-block schedule with each block twice; `vit12_merged_whole_lean`: the
  same one block sooner, `[16, 32, 32, 32, 32, 48, 48, 48, 48, 56, 56, 56]`; `vit12_merged`:
  `merged_tome`'s ToMe on it, `vision_r: [16, 0, 16, 0, 0, 0, 16, 0, 0, 0, 8, 0]`) and with patch dropout, the
  config's 1000 steps (--train-steps) at seeds 0 and 1, then validation t2i R@1, ITM accuracy and grounding
  Acc@0.5; the summary gives each drop against unmerged and whether it is within 0.03. Shorter runs cannot
  judge merging: after 300 steps grounding had not left 0.2-0.26 with or without it. One run moves each score
  by up to ~0.04 by chance (the learning rate x 1.001 did), as much as the goal's 0.03: --repeats N runs each
  variant and seed N times (lr x 1.001, x 1.002, ...) and judges the goals on the means. A merged run's final
  weights are validated a second time with every merging setting off (`*_all_tokens`: FLIP's reading, trained
  on fewer tokens and evaluated on all).
- vit6, vit12: the costs of the 6- and 12-block ViTs' quality settings (does merging hold where the ViT has
  blocks to spare, as ViT-B's 12 do?);
- speed: the merge config's step and inference times, unmerged, merge.yaml, merge-dense.yaml and the whole
  output at `[32, 48, 56]`, over this tree and over `--baseline REV` (same FLOPs, other code), each round a
  fresh process per tree, interleaved.
Per cost row:
- GFLOPs per training sample: one joint multi-task step, forward + backward, counted by FlopCounterMode
  with CPU attention (merging's gather/sort/scatter count 0, hence the times beside them);
- GFLOPs per inference sample: image and text towers plus the fused pass of the pair (ITM scoring), in
  evaluation mode (no patch dropout);
- CPU time of that step and pass as a ratio to the first setting, measured in this run: settings
  interleaved round by round, best of the rounds, so load from other processes on a shared machine
  distorts them least. One thread by default (--threads): on a busy 2-core machine OpenMP's spin-waiting
  made 2-thread step times swing 5x from one step to the next, while single-thread times held within ~15 %.

    python benchmarks/token_merging.py                                 # costs, goals, quality: hours on 2 cores
    python benchmarks/token_merging.py --parts quality --seeds 0            # one seed (run seed 1 beside it)
    python benchmarks/token_merging.py --parts quality --seeds 0 --variants unmerged,merged_whole --repeats 3
    python benchmarks/token_merging.py --parts quality --seeds 1 --variants unmerged --first-repeat 1  # one more
    python benchmarks/token_merging.py --parts speed --baseline HEAD~1      # this tree's step against a revision
    python benchmarks/token_merging.py --quick                         # a few minutes' smoke version
    python benchmarks/token_merging.py --smoke    # every measurement at the smallest sizes, seconds: checks it runs
"""

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

import torch
import yaml
from harness import ROOT, add_smoke_flag, build_from_config, report, revision_tree, run_isolated

from vlp.cli import run as vlp_run
from vlp.platform.model.token_merging import MERGING_OFF as MERGING_OFF_FIELDS
from vlp.platform.model.token_merging import TokenMergingConfig
from vlp.platform.run.flops import count_flops
from vlp.platform.run.perf import training_step_flops
from vlp.tasks.base import TrainableModule

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CONFIG = CONFIGS / "pretrain" / "shapes-tiny.yaml"
OVERLAY = CONFIGS / "overlays" / "merge.yaml"  # the default at 64 px with merging on
# on top of it: blocks that unmerge, grounding on every patch
DENSE = CONFIGS / "overlays" / "merge-dense.yaml"
# on top of it: the 12-block ViT, blocks that unmerge, the output whole
VIT12 = CONFIGS / "overlays" / "merge-vit12.yaml"
SETTINGS = {
    "r0": TokenMergingConfig(),
    "r4": TokenMergingConfig(vision_r=4),
    "r8": TokenMergingConfig(vision_r=8),
    "r16": TokenMergingConfig(vision_r=16),
    "r16dec": TokenMergingConfig(vision_r=16, schedule="decreasing"),
    "r8+fusion16": TokenMergingConfig(vision_r=8, fusion_r=16),
    "r16dec+text8": TokenMergingConfig(vision_r=16, schedule="decreasing", text_r=8),
    "r16dec+entry12": TokenMergingConfig(vision_r=16, schedule="decreasing", text_entry_r=12),
    "r32,16,8+entry12": TokenMergingConfig(vision_r=[32, 16, 8], text_entry_r=12),
}
BACKBONE = "--model.init_args.backbone.init_args"
GROUNDING = "--model.init_args.objectives.grounding.init_args"
PATCH_DROPOUT = (0.5, 0.75)  # FLIP's shares, without merging
OTHER_GRIDS = ("inputs", "none")  # grounding's readings of a merged image besides the default (positions)
T = TypeVar("T")


class Variant(NamedTuple):
    """A setting beside merging: patch dropout and how grounding reads the image."""

    merging: TokenMergingConfig
    patch_dropout: float = 0.0
    grounding_all_patches: bool = True  # grounding opts out of patch dropout (a second vision pass)
    grounding_patch_grid: str = "positions"  # `GroundingObjective.patch_grid`


Setting = TokenMergingConfig | Variant
ALBEF_STEP = ("itc", "itm", "mlm")  # the ViT-B goal's joint step (ALBEF's pre-training objectives)


def merging_arg(merging: dict) -> str:
    """The CLI argument that sets the backbone's merging (jsonargparse reads the JSON as the whole dict)."""
    return f"{BACKBONE}.merging={json.dumps(merging)}"


MERGING_OFF = [merging_arg(MERGING_OFF_FIELDS)]
# the merge config with a 6-block ViT: does merging keep the scores where the ViT has blocks to spare?
DEEP = [f"{BACKBONE}.vision.depth=6"]
DEEP12 = [f"{BACKBONE}.vision.depth=12"]  # and with ViT-B's 12 blocks
MODELS = {  # overrides of the default with configs/overlays/merge.yaml (each setting replaces its merging)
    "shapes-tiny-64px": [],
    "shapes-tiny-64px-vit6": [*DEEP, *MERGING_OFF],
    "shapes-tiny-64px-vit12": [*DEEP12, *MERGING_OFF],
    "vit-b16+bert-base": [
        f"{BACKBONE}.vision={json.dumps(dict(image_size=224, patch_size=16, width=768, depth=12, heads=12))}",
        f"{BACKBONE}.text={json.dumps(dict(width=768, depth=6, heads=12, max_len=64))}",
        f"{BACKBONE}.fusion={json.dumps(dict(depth=6, heads=12))}",
        f"{BACKBONE}.embed_dim=256",
        "--data.sources.shapes.init_args.image_size=224",
        *MERGING_OFF,  # the overlay's per-block vision_r fits its 3 blocks, not 12 (each setting sets its own)
    ],
}
PARTS = ("costs", "goals", "quality", "breakdown", "vit6", "vit12", "speed")
# --smoke: the ViT-B rows' overrides at the merge config's size (its rows keep their model name, so that
# `goals` reads them), the cost settings of each kind (vision_r with a schedule, text, fusion, entry, the
# overlays, grounding's grid, patch dropout with and without grounding) and the quality runs' few val images
SMOKE_VIT_B = [
    f"{BACKBONE}.vision={json.dumps(dict(image_size=64, patch_size=8, width=32, depth=2, heads=2))}",
    f"{BACKBONE}.text={json.dumps(dict(width=32, depth=1, heads=2, max_len=64))}",
    f"{BACKBONE}.fusion={json.dumps(dict(depth=1, heads=2))}",
    f"{BACKBONE}.embed_dim=32",
    "--data.sources.shapes.init_args.image_size=64",
    *MERGING_OFF,
]
SMOKE_SETTINGS = (
    "r0",
    "r16dec+text8",
    "r8+fusion16",
    "r32,16,8+entry12",
    "overlay",
    "tome",
    "overlay_grounding_none",
    "overlay_dense",
    "overlay_whole",
    "patch_dropout0.5",
    "patch_dropout0.5_grounding_too",
)
SMOKE_DATA = ["--data.sources.shapes.init_args.num_val=8"]


def build(config: Path, overrides: list[str]) -> tuple[TrainableModule, dict]:
    """The model of the config with the merging overlay (and CLI-style overrides), and the shapes source's
    collate + dataset."""
    module, data = build_from_config(config, [f"--config={OVERLAY}", *overrides], threads=None)
    return module, data.sources["shapes"]


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cost_rows(
    model: str,
    batch_size: int,
    settings: dict[str, Setting],
    rounds: int,
    objectives: tuple[str, ...] | None = None,
    overrides: list[str] | None = None,
) -> list[dict]:
    """FLOPs and CPU times (best of `rounds` >= 1, settings interleaved) of the default config's joint
    multi-task step (only `objectives`, on all rows, when given) and of inference, for one model size under
    each merging setting; ratios against the first setting. `overrides`: the model's, in place of
    `MODELS[model]` (--smoke's stand-in for ViT-B)."""
    started = time.perf_counter()
    module, source = build(CONFIG, MODELS[model] if overrides is None else overrides)
    if objectives is not None:
        for name in [name for name in module.objectives if name not in objectives]:
            del module.objectives[name]
        module.loss_weights = {name: module.loss_weights[name] for name in module.objectives}
        module.row_fractions = {}
        model = f"{model} {'+'.join(objectives)}"
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
        backbone.eval()  # patch dropout is off in evaluation
        image = backbone.encode_image(batch["image"])
        text = backbone.encode_text(batch["input_ids"], batch["attention_mask"])
        fused = backbone.fuse(image, text.tokens, text.attention_mask)
        backbone.train()
        return fused

    def apply(setting: Setting) -> None:
        variant = setting if isinstance(setting, Variant) else Variant(setting)
        backbone.set_merging(variant.merging)
        backbone.vision.set_patch_dropout(variant.patch_dropout)
        if "grounding" in module.objectives:
            module.objectives["grounding"].all_patches = variant.grounding_all_patches
            module.objectives["grounding"].patch_grid = variant.grounding_patch_grid

    rows = {}
    for name, setting in settings.items():  # counting FLOPs runs each setting once: it doubles as the warm-up
        apply(setting)
        inference()
        rows[name] = {
            "model": model,
            "setting": name,
            "batch": batch_size,
            "train_gflops": training_step_flops(module, batch) / batch_size / 1e9,
            "tokens_kept": round(backbone.tokens_kept, 3),  # of the step's last vision pass
            "infer_gflops": count_flops(inference) / batch_size / 1e9,
        }
    times = {name: {"train": [], "infer": []} for name in settings}
    for _ in range(rounds):
        for name, setting in settings.items():
            apply(setting)
            times[name]["train"].append(seconds(train_step))
            times[name]["infer"].append(seconds(inference))
    print(f"{model}: costs measured in {time.perf_counter() - started:.0f} s", flush=True)
    first = next(iter(settings))
    base = rows[first]
    base_train, base_infer = (min(times[first][k]) for k in ("train", "infer"))
    for name in settings:
        row = rows[name]
        row["train_flops_ratio"] = row["train_gflops"] / base["train_gflops"]
        row["infer_flops_ratio"] = row["infer_gflops"] / base["infer_gflops"]
        train_s, infer_s = (min(times[name][k]) for k in ("train", "infer"))
        row["train_step_s"], row["train_time_ratio"] = train_s, train_s / base_train
        row["infer_s"], row["infer_time_ratio"] = infer_s, infer_s / base_infer
    return list(rows.values())


def merging_of_overlay(overlay: Path = OVERLAY) -> dict:
    """An overlay's `merging` setting (configs/overlays/merge.yaml; merge-dense.yaml and merge-vit12.yaml name
    the fields they change of merge.yaml's)."""
    merging = yaml.safe_load(overlay.read_text())["model"]["init_args"]["backbone"]["init_args"]["merging"]
    return merging if overlay == OVERLAY else {**merging_of_overlay(), **merging}


def dense_variant() -> Variant:
    """configs/overlays/merge-dense.yaml on top of merge.yaml: its merging and grounding's patch grid."""
    grounding = yaml.safe_load(DENSE.read_text())["model"]["init_args"]["objectives"]["grounding"]
    return Variant(
        TokenMergingConfig(**merging_of_overlay(DENSE)),
        grounding_patch_grid=grounding["init_args"]["patch_grid"],
    )


BASE_LR = yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["optim"]["lr"]
WHOLE_MERGING = {**merging_of_overlay(DENSE), "vision_merge_output": False}
# the same within the FLOPs goal (0.543x): the second block merges 48 of 65 tokens instead of 32
WHOLE_LEAN_MERGING = {**WHOLE_MERGING, "vision_r": [32, 48, 56]}
# the whole output on the 6-block ViT, within the FLOPs goal (0.526x): 49, 33, 33, 17, 17 and 9 tokens per block
DEEP_WHOLE_MERGING = {**WHOLE_MERGING, "vision_r": [16, 32, 32, 48, 48, 56]}
# the same share of its tokens as three blocks keep at [32, 48, 56] (0.30 of the token-blocks): depth alone
DEEP_WHOLE_SHARE_MERGING = {**WHOLE_MERGING, "vision_r": [24, 40, 48, 48, 56, 56]}
# each caption merged by 12 tokens as it enters the fusion and by 4 after its first layer's attention (merge.yaml's
# until 2026-12-06, merge-dense.yaml's and merge-vit12.yaml's)
CAPTION_MERGING = {"text_entry_r": 12, "text_r": 4}
# ToMe's blocks on the merge config (merge.yaml's setting before the entry merge): 65 -> 33 -> 17 -> 9 image tokens
TOME_MERGING = {**merging_of_overlay(), **CAPTION_MERGING, "vision_entry_r": 0, "vision_r": [32, 16, 8]}
# merge.yaml's entry merge before it took 48 (25 tokens through every block), with the caption merging; and each
# of its two parts alone: which one costs ITM accuracy
ENTRY40_CAPTIONS_MERGING = {**merging_of_overlay(), **CAPTION_MERGING, "vision_entry_r": 40}
ENTRY40_MERGING = {**ENTRY40_CAPTIONS_MERGING, "text_entry_r": 0, "text_r": 0}
CAPTIONS_MERGING = {**ENTRY40_CAPTIONS_MERGING, "vision_entry_r": 0}
# configs/overlays/merge-vit12.yaml: the 6-block schedule with each block twice on the 12-block ViT (49, 49,
# 33 x 4, 17 x 4, 9, 9 tokens per block), merge-dense.yaml's blocks, the output whole
DEEP12_WHOLE_MERGING = merging_of_overlay(VIT12)
# the same schedule one block sooner (49, 33 x 4, 17 x 4, 9 x 3 tokens per block; 0.430x): room under the time goal
DEEP12_WHOLE_LEAN_MERGING = {**WHOLE_MERGING, "vision_r": [16, 32, 32, 32, 32, 48, 48, 48, 48, 56, 56, 56]}
# ToMe's blocks (output merged to 9 tokens, grounding on the patch grid) spread over 12 blocks, at the FLOPs of
# the whole output above: 65 -> 49 -> 33 -> 17 -> 9 tokens, merged in blocks 1, 3, 7 and 11
DEEP12_TOME_MERGING = {**TOME_MERGING, "vision_r": [16, 0, 16, 0, 0, 0, 16, 0, 0, 0, 8, 0]}


def whole_variant() -> Variant:
    """merge-dense.yaml's blocks with the ViT's output kept whole: every reader gets every patch's token."""
    return Variant(TokenMergingConfig(**WHOLE_MERGING))


def named_settings() -> dict[str, Setting]:
    """Every cost setting by name: `SETTINGS`, the overlays' merging (merge.yaml, its other grounding grids,
    merge-dense.yaml, the whole output) and patch dropout without merging."""
    overlay = TokenMergingConfig(**merging_of_overlay())
    return {
        **SETTINGS,
        "overlay": overlay,
        "tome": TokenMergingConfig(**TOME_MERGING),
        "entry40_captions": TokenMergingConfig(**ENTRY40_CAPTIONS_MERGING),
        **{f"overlay_grounding_{grid}": Variant(overlay, grounding_patch_grid=grid) for grid in OTHER_GRIDS},
        "overlay_dense": dense_variant(),
        "overlay_whole": whole_variant(),
        "overlay_whole_lean": Variant(TokenMergingConfig(**WHOLE_LEAN_MERGING)),
        **{f"patch_dropout{p}": Variant(SETTINGS["r0"], p) for p in PATCH_DROPOUT},
        **{f"patch_dropout{p}_grounding_too": Variant(SETTINGS["r0"], p, False) for p in PATCH_DROPOUT},
    }


# the speed part's settings: unmerged, merge.yaml, merge-dense.yaml and the unmerging ViT's whole output
SPEED_SETTINGS = ("r0", "overlay", "overlay_dense", "overlay_whole_lean")


def tree_step_seconds(names: list[str], batch_size: int) -> dict:
    """One round of `cost_rows` on the merge config for the named settings, over the `vlp` this process
    imported (`run_isolated(vlp_root=...)`: the tree measured)."""
    every = named_settings()
    return {"rows": cost_rows("shapes-tiny-64px", batch_size, {name: every[name] for name in names}, 1)}


def speed_rows(baseline: str, names: tuple[str, ...], rounds: int, batch_size: int) -> list[dict]:
    """The merge config's step and inference times under each setting over this tree and over `baseline` (a
    git revision, unpacked with `git archive`), each round a fresh process per tree, the trees' order
    alternating; best of the rounds. Both trees' FLOPs are kept beside (equal where only the code's speed
    changed)."""
    runs: dict[str, list[list[dict]]] = {"baseline": [], "this": []}
    with tempfile.TemporaryDirectory() as folder:
        trees = {"baseline": str(revision_tree(baseline, Path(folder))), "this": str(ROOT)}
        for round_index in range(rounds):
            for which in ("baseline", "this") if round_index % 2 == 0 else ("this", "baseline"):
                got = run_isolated(
                    __file__,
                    "tree_step_seconds",
                    3600,
                    trees[which],
                    names=list(names),
                    batch_size=batch_size,
                )
                runs[which].append(got["rows"])
    rows = []
    for index, name in enumerate(names):
        row = {"model": f"shapes-tiny-64px vs {baseline}", "setting": name, "batch": batch_size}
        for which, key in (("baseline", "baseline_"), ("this", "")):
            cells = [run[index] for run in runs[which]]
            row[f"{key}train_gflops"] = cells[0]["train_gflops"]
            row[f"{key}train_step_s"] = min(cell["train_step_s"] for cell in cells)
            row[f"{key}infer_s"] = min(cell["infer_s"] for cell in cells)
        row["train_speedup"] = row["baseline_train_step_s"] / row["train_step_s"]
        row["infer_speedup"] = row["baseline_infer_s"] / row["infer_s"]
        rows.append(row)
    for row in rows:  # each tree's step time as a ratio to its own unmerged step
        row["baseline_train_time_ratio"] = row["baseline_train_step_s"] / rows[0]["baseline_train_step_s"]
        row["train_time_ratio"] = row["train_step_s"] / rows[0]["train_step_s"]
    return rows


def fit(overrides: list[str], steps: int, batch_size: int, root: Path, seed: int) -> dict[str, float | None]:
    """`vlp fit` of the merging config (with overrides) for `steps` steps at `seed` (model and data), validated
    once at the end on the whole validation split."""
    start = time.perf_counter()
    sys.argv = sys.argv[:1]  # LightningCLI reads them too; the arguments are all here
    cli = vlp_run(
        [
            "fit",
            f"--config={CONFIG}",
            f"--config={OVERLAY}",
            *overrides,
            f"--seed_everything={seed}",
            f"--data.seed={seed}",
            f"--trainer.max_steps={steps}",
            f"--trainer.val_check_interval={steps}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.logger.init_args.save_dir={root}",
            f"--data.sources.shapes.init_args.batch_size={batch_size}",
        ]
    )
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    scores = {key: metrics.get(name) for key, name in SCORES.items()}
    wall_s = time.perf_counter() - start
    # the same weights validated on every token (FLIP's reading: train on fewer tokens, evaluate on all)
    backbone = cli.model.backbone
    if backbone.merging is not None and backbone.merging != TokenMergingConfig():
        with backbone.merging_override(**MERGING_OFF_FIELDS):
            (validated,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)
        scores |= {f"{key}_all_tokens": validated.get(SCORES[key]) for key in GOAL_SCORES}
    return {**scores, "wall_s": wall_s}


SCORES = {  # what the quality goal compares, and what is logged beside
    "t2i_r1": "val/retrieval/t2i_r1",
    "itm_acc": "val/itm/acc",
    "grounding_acc50": "val/grounding/acc50",
    "i2t_r1": "val/retrieval/i2t_r1",
    "mlm_acc": "val/mlm/acc",
    "samples_per_s": "perf/samples_per_s",
}
GOAL_SCORES = ("t2i_r1", "itm_acc", "grounding_acc50")


def quality_rows(
    variants: dict[str, list[str]],
    seeds: list[int],
    steps: int,
    batch_size: int,
    repeats: int = 1,
    first_repeat: int = 0,
) -> list[dict]:
    """Validation scores of the merge config under each variant (CLI overrides) after the same steps; each
    (variant, seed) run `repeats` times, repeat k with the learning rate x (1 + 0.001 k): the same seed, data
    order and initial weights, a change that should not matter, so the repeats' spread is one run's noise.
    Repeats are numbered from `first_repeat`, so a later run can add repeats to an earlier one's."""
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for seed in seeds:
            for repeat in range(first_repeat, first_repeat + repeats):
                lr = [f"--model.init_args.optim.lr={BASE_LR * (1 + 0.001 * repeat):.6g}"] if repeat else []
                for name, overrides in variants.items():
                    row = {
                        "variant": name,
                        "seed": seed,
                        "repeat": repeat,
                        "steps": steps,
                        "batch": batch_size,
                    }
                    rows.append({**row, **fit([*overrides, *lr], steps, batch_size, Path(root), seed)})
                    print(rows[-1], flush=True)
    return rows


def mean_score(rows: list[dict], key: str) -> float | None:
    """The mean of a score over runs (None when a run lacks it)."""
    values = [row[key] for row in rows]
    return None if not values or None in values else sum(values) / len(values)


def goals(costs: list[dict], quality: list[dict]) -> dict:
    """The issue's goals, each with its measured value and whether it holds."""
    found = {}

    def cost(model: str, setting: str, key: str) -> float | None:
        rows = [r for r in costs if r["model"] == model and r["setting"] == setting]
        return rows[0][key] if rows else None

    checks = [
        ("merge_config_flops_ratio", cost("shapes-tiny-64px", "overlay", "train_flops_ratio"), 0.55),
        ("merge_config_step_time_ratio", cost("shapes-tiny-64px", "overlay", "train_time_ratio"), 0.65),
        (
            "vit_b_itc_itm_mlm_flops_ratio",
            cost("vit-b16+bert-base itc+itm+mlm", "r16", "train_flops_ratio"),
            0.6,
        ),
        (
            "vit_b_itc_itm_mlm_step_time_ratio",
            cost("vit-b16+bert-base itc+itm+mlm", "r16", "train_time_ratio"),
            0.7,
        ),
    ]
    for name, value, bound in checks:
        if value is not None:
            found[name] = value
            found[f"{name}_goal_met"] = value <= bound
    prefixes = {  # merged variant: (its unmerged variant, the prefix of its summary keys)
        "merged": ("unmerged", ""),
        "merged_tome": ("unmerged", "tome_"),
        "merged_entry40_captions": ("unmerged", "entry40_captions_"),
        "merged_entry40": ("unmerged", "entry40_"),
        "merged_captions": ("unmerged", "captions_"),
        "merged_dense": ("unmerged", "dense_"),
        "merged_whole": ("unmerged", "whole_"),
        "merged_whole_lean": ("unmerged", "whole_lean_"),
        "vit6_merged_whole": ("vit6_unmerged", "vit6_whole_"),
        "vit6_merged_whole_share": ("vit6_unmerged", "vit6_whole_share_"),
        "vit12_merged_whole": ("vit12_unmerged", "vit12_whole_"),
        "vit12_merged": ("vit12_unmerged", "vit12_tome_"),
        "vit12_merged_whole_lean": ("vit12_unmerged", "vit12_whole_lean_"),
    }
    for seed in sorted({row["seed"] for row in quality}):
        for variant, (unmerged, prefix) in prefixes.items():
            plain = [r for r in quality if r["variant"] == unmerged and r["seed"] == seed]
            merged = [r for r in quality if r["variant"] == variant and r["seed"] == seed]
            for key in GOAL_SCORES:  # judged on the means over the repeats
                plain_mean, merged_mean = mean_score(plain, key), mean_score(merged, key)
                if plain_mean is not None and merged_mean is not None:
                    gap = plain_mean - merged_mean
                    found[f"seed{seed}_{prefix}{key}_drop"] = gap
                    found[f"seed{seed}_{prefix}{key}_goal_met"] = gap <= 0.03
                    if len(plain) > 1 or len(merged) > 1:  # how far the repeats spread: one run's noise
                        for name, runs in ((unmerged, plain), (variant, merged)):
                            values = [r[key] for r in runs]
                            found[f"seed{seed}_{name}_{key}_runs"] = values
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~2 minute smoke version")
    parser.add_argument(
        "--parts",
        default="costs,goals,quality",
        help="comma-separated: costs, goals, quality, breakdown, vit6, vit12, speed",
    )
    parser.add_argument("--train-steps", type=int, default=None, help="steps of each quality run (1000)")
    parser.add_argument("--seeds", default="0,1", help="seeds of the quality runs")
    parser.add_argument("--variants", default=None, help="quality variants to run (default: all)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="quality runs per variant and seed (lr x 1.001 each); goals on the means",
    )
    parser.add_argument(
        "--first-repeat",
        type=int,
        default=0,
        help="number of the first of those runs (lr x (1 + 0.001 k)): adds repeats to an earlier run's",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for every part")
    parser.add_argument("--baseline", default=None, help="git revision the speed part compares with")
    add_smoke_flag(parser)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.first_repeat < 0:
        parser.error(f"--first-repeat must be >= 0, got {args.first_repeat}")
    torch.set_num_threads(args.threads)
    if args.smoke:  # every part unless --parts names some, the speed part against HEAD unless --baseline
        args.parts = ",".join(PARTS) if args.parts == parser.get_default("parts") else args.parts
        args.baseline = args.baseline or "HEAD"

    def size(full: T, quick: T, smoke: T) -> T:
        """A size of the full run, of --quick's or of --smoke's."""
        return smoke if args.smoke else quick if args.quick else full

    parts, seeds = args.parts.split(","), [int(s) for s in args.seeds.split(",")]
    if "speed" in parts and not args.baseline:
        parser.error("--parts speed compares this tree with --baseline REV: name the revision")
    every = named_settings()
    rows: list[dict] = []
    if "costs" in parts:
        if args.quick:
            rows += cost_rows("shapes-tiny-64px", 16, {k: every[k] for k in ("r0", "overlay")}, rounds=1)
        elif args.smoke:
            rows += cost_rows("shapes-tiny-64px", 2, {k: every[k] for k in SMOKE_SETTINGS}, rounds=1)
            vit_b = {k: SETTINGS[k] for k in ("r0", "r16")}
            rows += cost_rows("vit-b16+bert-base", 2, vit_b, rounds=1, overrides=SMOKE_VIT_B)
        else:
            rows += cost_rows("shapes-tiny-64px", 64, every, rounds=3)
            rows += cost_rows("vit-b16+bert-base", 2, SETTINGS, rounds=2)
    if "goals" in parts:  # the merge config's settings of the goals (those of `costs` when it ran)
        if "costs" not in parts or args.quick:
            dropout = [f"patch_dropout{p}{too}" for p in PATCH_DROPOUT for too in ("", "_grounding_too")]
            grids = [f"overlay_grounding_{grid}" for grid in OTHER_GRIDS]
            goal_settings = (
                "r0",
                "overlay",
                "tome",
                "entry40_captions",
                *grids,
                "overlay_dense",
                "overlay_whole",
                *dropout,
            )
            batch, rounds = size((64, 3), (16, 1), (2, 1))
            rows += cost_rows("shapes-tiny-64px", batch, {k: every[k] for k in goal_settings}, rounds)
        vit_b = {"r0": SETTINGS["r0"], "r16": SETTINGS["r16"]}
        rows += cost_rows(
            "vit-b16+bert-base",
            size(8, 2, 2),
            vit_b,
            size(2, 1, 1),
            ALBEF_STEP,
            SMOKE_VIT_B if args.smoke else None,
        )
    if "vit6" in parts:  # the merge config with a 6-block ViT: unmerged against the whole output
        vit6 = {
            "r0": SETTINGS["r0"],
            "vit6_whole": Variant(TokenMergingConfig(**DEEP_WHOLE_MERGING)),
            "vit6_whole_share": Variant(TokenMergingConfig(**DEEP_WHOLE_SHARE_MERGING)),
        }
        rows += cost_rows("shapes-tiny-64px-vit6", size(64, 16, 2), vit6, size(3, 1, 1))
    if "vit12" in parts:  # the same with 12 blocks, ViT-B's depth
        vit12 = {
            "r0": SETTINGS["r0"],
            "vit12_whole": Variant(TokenMergingConfig(**DEEP12_WHOLE_MERGING)),
            "vit12_whole_lean": Variant(TokenMergingConfig(**DEEP12_WHOLE_LEAN_MERGING)),
            "vit12_tome": TokenMergingConfig(**DEEP12_TOME_MERGING),
        }
        rows += cost_rows("shapes-tiny-64px-vit12", size(64, 16, 2), vit12, size(3, 1, 1))
    if "speed" in parts:  # the same step over this tree and over --baseline's (--smoke: unmerged and merged)
        names = size(SPEED_SETTINGS, SPEED_SETTINGS, SPEED_SETTINGS[:2])
        rows += speed_rows(args.baseline, names, size(5, 2, 1), size(64, 16, 2))
    if "breakdown" in parts:  # the merge config's step with one objective beside the towers, on all rows
        pair = {k: every[k] for k in ("r0", "overlay")}
        singles = ("itc", "itm", "mlm", "caption", "grounding")
        for objectives in (None, *((name,) for name in size(singles, singles, ("grounding",)))):
            rows += cost_rows("shapes-tiny-64px", size(64, 16, 2), pair, 1, objectives)
    quality = []
    if "quality" in parts:
        steps = args.train_steps or size(1000, 5, 1)
        variants = {
            "unmerged": MERGING_OFF,
            "merged": [],
            "merged_tome": [merging_arg(TOME_MERGING)],
            "merged_entry40_captions": [merging_arg(ENTRY40_CAPTIONS_MERGING)],
            "merged_entry40": [merging_arg(ENTRY40_MERGING)],
            "merged_captions": [merging_arg(CAPTIONS_MERGING)],
            "merged_dense": [f"--config={DENSE}"],
            "merged_whole": [merging_arg(WHOLE_MERGING)],
            "merged_whole_lean": [merging_arg(WHOLE_LEAN_MERGING)],
            "vit6_unmerged": MODELS["shapes-tiny-64px-vit6"],
            "vit6_merged_whole": [*DEEP, merging_arg(DEEP_WHOLE_MERGING)],
            "vit6_merged_whole_share": [*DEEP, merging_arg(DEEP_WHOLE_SHARE_MERGING)],
            "vit12_unmerged": MODELS["shapes-tiny-64px-vit12"],
            "vit12_merged_whole": [*DEEP12, merging_arg(DEEP12_WHOLE_MERGING)],
            "vit12_merged_whole_lean": [*DEEP12, merging_arg(DEEP12_WHOLE_LEAN_MERGING)],
            "vit12_merged": [*DEEP12, merging_arg(DEEP12_TOME_MERGING)],
        }
        for grid in OTHER_GRIDS:  # grounding's other readings of the merged image
            variants[f"merged_grounding_{grid}"] = [f"{GROUNDING}.patch_grid={grid}"]
        for share in PATCH_DROPOUT:
            variants[f"patch_dropout{share}"] = [*MERGING_OFF, f"{BACKBONE}.vision.patch_dropout={share}"]
            too = f"{GROUNDING}.all_patches=false"  # grounding on the kept patches as well
            variants[f"patch_dropout{share}_grounding_too"] = [*variants[f"patch_dropout{share}"], too]
        if args.variants:
            variants = {name: variants[name] for name in args.variants.split(",")}
        elif args.smoke:  # unmerged and merged (its final weights validated on every token too)
            variants = {name: variants[name] for name in ("unmerged", "merged")}
        if args.smoke:
            variants = {name: [*overrides, *SMOKE_DATA] for name, overrides in variants.items()}
        quality = quality_rows(
            variants,
            seeds[:1] if args.quick or args.smoke else seeds,
            steps,
            size(64, 16, 4),
            args.repeats,
            args.first_repeat,
        )
    summary = {"overlay_merging": merging_of_overlay(), **goals(rows, quality)}
    name = "token_merging_quick" if args.quick else "token_merging"
    partial = [
        args.parts != parser.get_default("parts"),
        args.seeds != parser.get_default("seeds"),
        args.variants,
        args.repeats != 1 or args.first_repeat != 0,
        args.train_steps is not None,
    ]
    if any(partial):  # a partial run keeps the full one's file (and the other partial runs')
        name += f"_{'_'.join(parts)}_seeds{'_'.join(map(str, seeds))}"
        name += f"_{args.variants.replace(',', '_')}" if args.variants else ""
        if args.repeats == 1 and args.first_repeat:  # one run, named by its number
            name += f"_repeat{args.first_repeat}"
        else:
            name += f"_repeats{args.repeats}" if args.repeats != 1 else ""
            name += f"_from{args.first_repeat}" if args.first_repeat else ""
        name += f"_steps{args.train_steps}" if args.train_steps is not None else ""
    report(name, rows + quality, summary, smoke=args.smoke)


if __name__ == "__main__":
    main()
