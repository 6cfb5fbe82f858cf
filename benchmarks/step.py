"""Step efficiency: what each objective costs alone, together, in generation and in validation, old vs new.

For the default model (configs/pretrain/shapes-tiny.yaml, its text and fusion MLPs at the baseline's 4x width
so that old and new code run the same model) and a ViT-B/16 + BERT-base sized backbone (random
weights; ALBEF's split of BERT-base: 6 text + 6 fusion layers; the shapes vocabulary) at a small batch:
- forward + backward time and GFLOPs of each objective alone (its own unimodal passes included), of the joint
  ITC+ITM+MLM step and of the joint step of all five, next to the sum of the singles;
- greedy caption generation, generated tokens per second;
- validation time of a few val batches of every objective (retrieval, ITM, MLM, captioning, grounding).
Old vs new side by side in one run: the same measurement runs in a fresh process over the current tree and
over `--baseline` (a git revision, default the commit before the shared fusion work and the decoder cache,
unpacked with `git archive`), interleaved round by round; times are the best of the rounds at one thread
(on a shared 2-core machine OpenMP spin-waiting makes multi-thread times swing), so other load distorts least.

    python benchmarks/step.py            # ~20 min on 2 CPU cores (ViT-B: ~11 min a round)
    python benchmarks/step.py --quick    # the default model only, one round
    python benchmarks/step.py --smoke    # every measurement at the smallest sizes, seconds: checks it runs
    python benchmarks/step.py --models vit-b16+bert-base --rounds 1   # writes results/step-<models>.json
    python benchmarks/step.py --profile  # torch.profiler's top ops of the default joint step, old and new
    python benchmarks/step.py --albef    # one ALBEF training step: LAVIS 1.0.2 against vlp (~6 min)

`--albef` compares one training step (forward + backward) at ViT-B/16 224 px + BERT-base 6 + 6, random
weights, one thread, `--albef-batch` captions of COCO-like length, each variant in a fresh process per
round, interleaved: LAVIS's `AlbefPretrain.forward` as shipped (momentum model, queue 65,536, captions
padded to 30 tokens) and with the momentum model removed (its passes return zeros), against vlp's joint
ITC + ITM + MLM with its defaults (pre-norm, no momentum) and with ALBEF's options on (post-norm, eps 1e-12,
clamped temperature, momentum distillation alpha 0.4, a full 65,536 queue, ITM negatives and MLM masking
as ALBEF's). GFLOPs counted by torch's FLOP counter on the same step.
"""

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from harness import ROOT, add_smoke_flag, build_from_config, report, revision_tree, run_isolated

CONFIG = ROOT / "configs" / "pretrain" / "shapes-tiny.yaml"
BASELINE = "5555d96"  # main before the shared fusion work and the decoder cache (issue #13)
BACKBONE = "--model.init_args.backbone.init_args"
MODELS = {
    "shapes-tiny": {"overrides": [], "batch": 64},
    "vit-b16+bert-base": {
        "overrides": [
            f'{BACKBONE}.vision={{"image_size": 224, "patch_size": 16, "width": 768, "depth": 12, "heads": 12}}',
            f'{BACKBONE}.text={{"width": 768, "depth": 6, "heads": 12, "max_len": 48, "pool": "mean"}}',
            f'{BACKBONE}.fusion={{"depth": 6, "heads": 12}}',
            f"{BACKBONE}.embed_dim=256",
            "--data.sources.shapes.init_args.image_size=224",
        ],
        "batch": 8,
    },
}
SINGLES = ("itc", "itm", "mlm", "caption", "grounding")
VAL_BATCHES = 2
SMOKE_BATCH = 2  # --smoke: the default model at the smallest batch with in-batch negatives, one round


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def comparable_config(folder: Path) -> Path:
    """The default config with the text and fusion MLPs at 4x width, as they were at the baseline (which
    has no `mlp_ratio` for them; the default now uses 2x), its backbone inline (the default reads it from
    configs/models/), without ITM's hard-negative warm-up (which the baseline lacks; it changes which negatives
    are drawn, not the work) and without row fractions (the baseline lacks them; `measure` calls each
    objective on every row), written under `folder`: old and new code measure the same model."""
    config = yaml.safe_load(CONFIG.read_text())
    model = config["model"]["init_args"]
    if isinstance(model["backbone"], str):  # a model file (configs/models/), written inline for the baseline
        model["backbone"] = yaml.safe_load((CONFIG.parent / model["backbone"]).read_text())
    backbone = model["backbone"]["init_args"]
    for tower in ("text", "fusion"):
        backbone[tower].pop("mlp_ratio", None)
    model["objectives"]["itm"].get("init_args", {}).pop("hard_negative_warmup", None)
    model.pop("row_fractions", None)  # the baseline lacks them; the objectives measured here read every row
    path = folder / CONFIG.name
    path.write_text(yaml.safe_dump(config))
    return path


def build(model: str):
    """The module (model size `model`) and shapes source of `comparable_config`, from the `vlp` this process
    imports (`run_isolated(vlp_root=...)`: the tree measured)."""
    with tempfile.TemporaryDirectory() as folder:  # read once, while the module is built
        module, data = build_from_config(comparable_config(Path(folder)), MODELS[model]["overrides"])
    return module, data.sources["shapes"]


def profile(steps: int = 3) -> str:
    """torch.profiler's top CPU ops (self time) of the default model's joint training step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    module, source = build("shapes-tiny")
    train = source.dataset("train")
    batch = {**source.collate([train[i] for i in range(MODELS["shapes-tiny"]["batch"])]), "global_step": 0}

    def step() -> None:
        module.training_step(batch, 0)["loss"].backward()
        module.zero_grad(set_to_none=True)

    step()
    with profiler(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50)


def profile_table() -> dict:
    return {"table": profile()}


def measure(model: str, rounds: int, batch_size: int | None = None) -> dict:
    """Times (best of `rounds`) and FLOPs of the `vlp` this process imports; runs in its own process.
    `batch_size`: rows per step and val batch in place of the model's (--smoke)."""
    module, source = build(model)
    import torch

    from vlp.platform.model.backbone import FeatureCache

    try:
        from vlp.platform.run.flops import count_flops
    except ModuleNotFoundError:  # revisions before vlp/platform/run/ (the default baseline)
        from vlp.platform.flops import count_flops

    spec = {**MODELS[model], **({"batch": batch_size} if batch_size is not None else {})}
    backbone, objectives = module.backbone, module.objectives
    train = source.dataset("train")
    batch = {**source.collate([train[i] for i in range(spec["batch"])]), "global_step": 0}

    def step(names: tuple[str, ...]) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            features = FeatureCache(backbone, batch)
            return sum(objectives[name].forward_loss(batch, features).loss for name in names)

        return run

    def forward_backward(names: tuple[str, ...]) -> None:
        torch.manual_seed(0)
        step(names)().backward()
        module.zero_grad(set_to_none=True)

    steps = {name: (name,) for name in SINGLES} | {
        "itc+itm+mlm": ("itc", "itm", "mlm"),
        "joint (all five)": SINGLES,
    }
    flops = {key: count_flops(step(names), backward=True) for key, names in steps.items()}
    module.zero_grad(set_to_none=True)
    caption = objectives["caption"]
    val = source.dataset("val")
    val_batches = [
        source.collate([val[i] for i in range(k * spec["batch"], (k + 1) * spec["batch"])])
        for k in range(VAL_BATCHES)
    ]
    images = val_batches[0]["image"]

    @torch.no_grad()
    def generate() -> int:
        tokens = caption.generate(backbone.encode_image(images))
        return int((tokens != backbone.tokenizer.pad_token_id).sum())

    @torch.no_grad()
    def validate() -> None:
        module.eval()
        for index, val_batch in enumerate(val_batches):
            module.validation_step(val_batch, index)
        module.on_validation_epoch_end()
        module.train()

    generated = generate()
    for names in steps.values():  # warm-up: first calls allocate and pick kernels
        forward_backward(names)
    validate()
    times: dict[str, list[float]] = {key: [] for key in [*steps, "generate", "validate"]}
    for _ in range(rounds):
        for key, names in steps.items():
            times[key].append(seconds(lambda names=names: forward_backward(names)))
        times["generate"].append(seconds(generate))
        times["validate"].append(seconds(validate))
    best = {key: min(values) for key, values in times.items()}
    return {
        "flops": flops,
        "seconds": best,
        "generated_tokens": generated,
        "val_samples": VAL_BATCHES * spec["batch"],
    }


ALBEF_CAPTIONS = [
    "a man riding a wave on top of a surfboard",
    "two dogs play with a frisbee in the green grass of a park",
    "a plate of food with broccoli and rice",
    "a red double decker bus driving down a city street next to tall buildings",
    "a cat sleeping on a laptop keyboard",
    "people standing around a kitchen preparing a meal together on a sunny afternoon",
    "a giraffe eating leaves from a tall tree",
    "an old clock tower in the middle of a town square",
]
ALBEF_VARIANTS = ("lavis", "lavis-no-momentum", "vlp", "vlp-albef-options")


def albef_step(variant: str, batch: int) -> dict:
    """Best-effort single measurement of one training step of `variant` (see `--albef`): seconds of the
    second step (the first allocates) and GFLOPs; runs in its own process."""
    import torch

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests" / "support"))
    torch.set_num_threads(1)
    from lavis_reference import albef_pretrain, bert_tokenizer

    from vlp.platform.run.flops import count_flops

    tokenizer = bert_tokenizer()
    captions = (ALBEF_CAPTIONS * batch)[:batch]
    torch.manual_seed(0)
    images = torch.randn(batch, 3, 224, 224)
    if variant.startswith("lavis"):
        model = albef_pretrain(
            image_size=224, patch_size=16, vision_width=768, vision_depth=12, vision_heads=12,
            text_width=768, text_layers=6, fusion_layers=6, text_heads=12, embed_dim=256,
            queue_size=65536, max_position=512,
        ).train()  # fmt: skip
        if variant == "lavis-no-momentum":
            remove_momentum(model)
        samples = {"image": images, "text_input": captions, "epoch": 2, "iters": 0, "num_iters_per_epoch": 1}

        def run() -> torch.Tensor:
            return model(samples).loss

    else:
        run = vlp_albef_step(variant, tokenizer, images, captions)
        model = None

    def step() -> None:
        torch.manual_seed(0)
        run().backward()

    step()
    seconds_ = seconds(step)
    flops = count_flops(run, backward=True)
    return {"seconds": seconds_, "gflops": flops / 1e9}


def remove_momentum(model) -> None:
    """LAVIS's AlbefPretrain without its momentum model's work: the momentum passes return zeros of their
    shapes and the EMA update does nothing (the queue stays)."""
    from types import SimpleNamespace

    import torch

    model.model_pairs = []
    width = model.text_encoder.config.hidden_size

    class Zeros(torch.nn.Module):
        def __init__(self, kind: str) -> None:
            super().__init__()
            self.kind = kind

        def forward(self, x=None, attention_mask=None, **kwargs):
            if self.kind == "vision":
                return torch.zeros(x.shape[0], 197, model.visual_encoder.vision_width)
            if self.kind == "text":
                return SimpleNamespace(last_hidden_state=torch.zeros(*x.shape, width))
            return torch.zeros(*x.shape, model.text_encoder.config.vocab_size)

    model.visual_encoder_m = Zeros("vision")
    model.text_encoder_m = Zeros("mlm")
    model.text_encoder_m.bert = Zeros("text")


def vlp_albef_step(variant: str, tokenizer, images, captions):
    """vlp's joint ITC + ITM + MLM step at ALBEF's size: its defaults, or ALBEF's options."""
    from functools import partial

    import torch

    from vlp.platform.model.backbone import FeatureCache, FusionBackbone
    from vlp.platform.model.encoders import TextConfig, VisionConfig
    from vlp.platform.model.fusion import FusionConfig
    from vlp.platform.model.momentum import MomentumConfig
    from vlp.tasks.itc import ITCObjective
    from vlp.tasks.itm import ITMObjective
    from vlp.tasks.mlm import MLMObjective
    from vlp.tasks.multitask import MultiTaskModule

    albef = variant == "vlp-albef-options"
    backbone = FusionBackbone(
        vision=VisionConfig(model="vit_base_patch16_224", image_size=224),
        text=TextConfig(width=768, depth=6, heads=12, max_len=40, token_types=not albef),
        fusion=FusionConfig(
            depth=6, heads=12, **({"norm": "post", "layer_norm_eps": 1e-12} if albef else {})
        ),
        embed_dim=256,
        tokenizer=tokenizer,
        **({"temperature": "clamped", "momentum": MomentumConfig(0.995)} if albef else {}),
    )
    if albef:
        objectives = {
            "itc": partial(ITCObjective, alpha=0.4, queue_size=65536),
            "itm": partial(ITMObjective, negatives="albef"),
            "mlm": partial(MLMObjective, alpha=0.4, masking="albef"),
        }
    else:
        objectives = {"itc": ITCObjective, "itm": ITMObjective, "mlm": MLMObjective}
    module = MultiTaskModule(backbone, objectives, mode="joint").train()
    if albef:  # a full queue, as ALBEF's always is
        queue = module.objectives["itc"].queue
        rows = torch.nn.functional.normalize(torch.randn(65536, 256), dim=-1)
        queue.enqueue(rows, rows, torch.full((65536,), -1))
    text = tokenizer(captions, padding="longest", return_tensors="pt")
    batch = {
        "image": images,
        "input_ids": text.input_ids,
        "attention_mask": text.attention_mask,
        "image_id": torch.arange(len(captions)),
        "global_step": 10**6,
    }

    def run() -> torch.Tensor:
        features = FeatureCache(backbone, batch, share_global_rows=True)
        return sum(module.objectives[name].forward_loss(batch, features).loss for name in objectives)

    return run


def albef_compare(batch: int, rounds: int) -> list[dict]:
    """Each variant in a fresh process per round, the order rotating; best time of the rounds."""
    runs: dict[str, list[dict]] = {variant: [] for variant in ALBEF_VARIANTS}
    for round_index in range(rounds):
        order = ALBEF_VARIANTS[round_index % 4 :] + ALBEF_VARIANTS[: round_index % 4]
        for variant in order:
            runs[variant].append(
                run_isolated(__file__, "albef_step", timeout=3600, variant=variant, batch=batch)
            )
    best = {
        v: {"seconds": min(r["seconds"] for r in rs), "gflops": rs[0]["gflops"]} for v, rs in runs.items()
    }
    rows = []
    for variant, reference in (("vlp", "lavis-no-momentum"), ("vlp-albef-options", "lavis")):
        ours, theirs = best[variant], best[reference]
        rows.append(
            {
                "vlp": variant,
                "lavis": reference,
                "vlp_s": ours["seconds"],
                "lavis_s": theirs["seconds"],
                "time_ratio": ours["seconds"] / theirs["seconds"],
                "vlp_gflops": ours["gflops"],
                "lavis_gflops": theirs["gflops"],
                "flop_ratio": ours["gflops"] / theirs["gflops"],
            }
        )
    return rows


def compare(model: str, baseline_root: Path, rounds: int, batch_size: int | None = None) -> list[dict]:
    """Rows old vs new for one model: each round measures both trees, alternating which goes first.
    `batch_size`: in place of the model's (--smoke)."""
    results: dict[str, list[dict]] = {"old": [], "new": []}
    trees = {"old": str(baseline_root), "new": str(ROOT)}
    for round_index in range(rounds):
        order = ("old", "new") if round_index % 2 == 0 else ("new", "old")
        for which in order:
            results[which].append(
                run_isolated(
                    __file__, "measure", 3600, trees[which], model=model, rounds=1, batch_size=batch_size
                )
            )
    merged = {}
    for which, runs in results.items():
        seconds_ = {key: min(run["seconds"][key] for run in runs) for key in runs[0]["seconds"]}
        merged[which] = {**runs[0], "seconds": seconds_}
    rows = []
    for key in [*SINGLES, "sum itc+itm+mlm", "itc+itm+mlm", "sum of five", "joint (all five)"]:
        row = {"model": model, "step": key}
        for which in ("old", "new"):
            got = merged[which]
            parts = {"sum itc+itm+mlm": ("itc", "itm", "mlm"), "sum of five": SINGLES}.get(key, (key,))
            row[f"{which}_s"] = sum(got["seconds"][part] for part in parts)
            row[f"{which}_gflops"] = sum(got["flops"][part] for part in parts) / 1e9
        row["speedup"] = row["old_s"] / row["new_s"]
        rows.append(row)
    for key, unit in (("generate", "generate tok/s"), ("validate", "validate samples/s")):
        row = {"model": model, "step": unit}
        for which in ("old", "new"):
            got = merged[which]
            count = got["generated_tokens"] if key == "generate" else got["val_samples"]
            row[f"{which}_s"] = got["seconds"][key]
            row[f"{which}_per_s"] = count / got["seconds"][key]
        row["speedup"] = row["old_s"] / row["new_s"]
        rows.append(row)
    return rows


def goals(rows: list[dict]) -> dict:
    """The issue's targets per model measured: joint <= 0.6x singles, ITM >= 1.6x, generation >= 3x.

    The joint ITC+ITM+MLM step saves the singles' repeated unimodal passes (two image passes and one caption
    pass) and nothing of fusion, which every objective needs for its own pairs; so the ratio falls as the
    image tower's share of the work grows (measured 0.68-0.79 for the default's 10 image tokens, 0.40 for ViT-B)."""
    result = {}
    for model in dict.fromkeys(row["model"] for row in rows):
        by_step = {row["step"]: row for row in rows if row["model"] == model}
        ratio = by_step["itc+itm+mlm"]["new_s"] / by_step["sum itc+itm+mlm"]["new_s"]
        result[f"{model}: joint itc+itm+mlm / sum of singles (goal <= 0.6)"] = ratio
        result[f"{model}: itm speed-up vs baseline (goal >= 1.6)"] = by_step["itm"]["speedup"]
        result[f"{model}: generation speed-up vs baseline (goal >= 3)"] = by_step["generate tok/s"]["speedup"]
        result[f"{model}: validation speed-up vs baseline"] = by_step["validate samples/s"]["speedup"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="default model only, one round")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="measure only these models")
    parser.add_argument("--profile", action="store_true", help="print the top ops of old and new, then stop")
    parser.add_argument("--albef", action="store_true", help="one ALBEF training step: LAVIS against vlp")
    parser.add_argument("--albef-batch", type=int, default=4)
    add_smoke_flag(parser)
    args = parser.parse_args()
    if args.smoke and (args.albef or args.profile):  # not a full run under the smoke flag
        parser.error("--smoke covers the default run; --albef and --profile have no smoke variant")
    if args.albef:
        rows = albef_compare(args.albef_batch, args.rounds)
        report(f"step-albef-b{args.albef_batch}", rows, {"rounds": args.rounds})
        return
    if args.profile:
        with tempfile.TemporaryDirectory() as folder:
            baseline = revision_tree(args.baseline, Path(folder))
            for which, root in (("old", baseline), ("new", ROOT)):
                table = run_isolated(__file__, "profile_table", 600, str(root))["table"]
                print(f"== {which} ({root})\n{table}")
        return
    models = ["shapes-tiny"] if args.quick or args.smoke else args.models or list(MODELS)
    rounds = 1 if args.quick or args.smoke else args.rounds
    batch_size = SMOKE_BATCH if args.smoke else None  # None: each model's own batch
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        baseline = revision_tree(args.baseline, Path(folder))
        for model in models:
            started = time.perf_counter()
            rows += compare(model, baseline, rounds, batch_size)
            print(f"{model}: measured in {time.perf_counter() - started:.0f} s", flush=True)
    name = "step" if models == list(MODELS) else "step-" + "-".join(models)  # a subset keeps the full file
    report(name, rows, {"baseline": args.baseline, **goals(rows)}, smoke=args.smoke)


if __name__ == "__main__":
    main()
