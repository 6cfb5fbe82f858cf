"""What the momentum model costs: step time and peak memory of the default's joint step with and without it.

The default config (configs/pretrain/shapes-tiny.yaml) as it is, and with ALBEF's momentum distillation
switched on: an EMA copy of the backbone (decay 0.995), an ITC queue of `--queue` momentum embeddings and
alpha 0.4 for ITC, MLM and captioning. A step is forward + backward + AdamW + the EMA update; times are the
best of interleaved rounds at one thread; memory is the peak RSS growth of one process running three steps.

    python benchmarks/momentum.py
    python benchmarks/momentum.py --smoke    # every measurement at the smallest sizes, seconds: checks it runs
"""

import argparse
import json
import time
from pathlib import Path

from harness import add_smoke_flag, build_from_config, peak_rss_growth_mib, report, run_isolated

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "pretrain" / "shapes-tiny.yaml"
ARGS = "--model.init_args"
BATCH = 64  # the default config's batch
SMOKE = {"queue": 8, "rounds": 1, "batch": 2}  # --smoke: a queue that wraps within the steps, one timed step


def overrides(momentum: bool, queue: int) -> list[str]:
    if not momentum:
        return []
    objectives = {
        "itc": {"class_path": "vlp.tasks.itc.ITCObjective", "init_args": {"alpha": 0.4, "queue_size": queue}},
        "itm": {"class_path": "vlp.tasks.itm.ITMObjective"},
        "mlm": {"class_path": "vlp.tasks.mlm.MLMObjective", "init_args": {"alpha": 0.4}},
        "caption": {
            "class_path": "vlp.tasks.caption.CaptionObjective",
            "init_args": {"max_length": 32, "alpha": 0.4},
        },
        "grounding": {"class_path": "vlp.tasks.grounding.GroundingObjective"},
    }
    return [
        f"{ARGS}.backbone.init_args.momentum={{decay: 0.995}}",
        f"{ARGS}.objectives={json.dumps(objectives)}",
    ]


def trainer_step(momentum: bool, queue: int, batch: int = BATCH):
    """A module of the default config and a function running one optimizer step on `batch` rows."""
    from vlp.platform.optim import OptimConfig, build_optimizer

    module, data = build_from_config(CONFIG, overrides(momentum, queue))
    source = data.sources["shapes"]
    optimizer = build_optimizer(module, OptimConfig(), total_steps=100)["optimizer"]
    train = source.dataset("train")
    batches = [source.collate([train[i] for i in range(k * batch, (k + 1) * batch)]) for k in range(2)]
    calls = [0]

    def step() -> None:
        batch = {**batches[calls[0] % 2], "global_step": calls[0]}
        calls[0] += 1
        module.training_step(batch, 0)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if module.backbone.momentum is not None:
            module.backbone.momentum.update()

    return module, step


def measure(momentum: bool, queue: int, rounds: int, batch: int = BATCH) -> dict:
    module, step = trainer_step(momentum, queue, batch)
    memory = peak_rss_growth_mib(lambda: [step() for _ in range(3)])
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in module.parameters())
    return {"step_s": min(times), "peak_rss_growth_mib": memory, "parameters_m": params / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queue", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=8)
    add_smoke_flag(parser)
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else {"queue": args.queue, "rounds": args.rounds, "batch": BATCH}
    rows = []
    for momentum in (False, True):
        got = run_isolated(__file__, "measure", timeout=1800, momentum=momentum, **sizes)
        rows.append({"momentum": momentum, "queue": sizes["queue"] if momentum else 0, **got})
    report("momentum", rows, {"step time ratio": rows[1]["step_s"] / rows[0]["step_s"]}, smoke=args.smoke)


if __name__ == "__main__":
    main()
