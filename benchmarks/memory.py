"""Bytes per rank of parameters, gradients and optimizer state under DDP, FSDP2, ZeRO-2 and ZeRO-3 on 2 ranks.

Model: a ViT-B/16 (224 px) + BERT-base backbone with ALBEF's split (6 text + 6 fusion layers), ITC + ITM +
MLM heads, random weights, the shapes vocabulary (so Ψ lacks BERT's 23 M-parameter word embeddings).
Each strategy runs in 2 fresh CPU processes (gloo), one AdamW training step at batch 2, then counts the
tensors each rank holds:
- DDP and FSDP2: fp32 training (Lightning `32-true`); FSDP2 counts the local shards of its DTensors.
- ZeRO-2 / ZeRO-3 (DeepSpeed, CPU accelerator): bf16 training as in the ZeRO paper (bf16 parameters and
  gradients, fp32 master weights and Adam moments), counted from DeepSpeed's partitions.
Next to them the paper's formulas for mixed-precision Adam (K = 12: fp32 master, momentum, variance):
DDP 16Ψ, ZeRO-2 2Ψ + 14Ψ/N, ZeRO-3 16Ψ/N (fp32 training: 4Ψ params + 4Ψ grads + 8Ψ Adam = 16Ψ, all /N
under FSDP2). Peak: growth of each rank's peak resident set over the step (CPU, so it includes
activations, communication buffers and the allocator's slack). Results: benchmarks/results/memory.json.

    python benchmarks/memory.py            # ~2 min on 2 CPU cores, up to ~5 GiB per rank
    python benchmarks/memory.py --quick    # a small backbone, ~2 min (two fresh processes per strategy)
    python benchmarks/memory.py --smoke    # every measurement at the smallest sizes, seconds: checks it runs
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import add_smoke_flag, report

WORLD = 2
STRATEGIES = ["ddp", "fsdp2", "zero2", "zero3"]
GIB = 2**30


def _model(quick: bool):
    from vlp.datamodules.shapes import ShapesSource
    from vlp.platform.model.backbone import FusionBackbone
    from vlp.platform.model.encoders import TextConfig, VisionConfig
    from vlp.platform.model.fusion import FusionConfig
    from vlp.tasks.itc import ITCObjective
    from vlp.tasks.itm import ITMObjective
    from vlp.tasks.mlm import MLMObjective
    from vlp.tasks.multitask import MultiTaskModule

    size = 64 if quick else 224
    source = ShapesSource(image_size=size, num_train=64, num_val=8, num_test=8, batch_size=2)
    width, heads, depth = (64, 2, 2) if quick else (768, 12, 12)
    torch.manual_seed(0)
    backbone = FusionBackbone(
        vision=VisionConfig(image_size=size, patch_size=16, width=width, depth=depth, heads=heads),
        text=TextConfig(width=width, depth=depth // 2, heads=heads, max_len=64),
        fusion=FusionConfig(depth=depth // 2, heads=heads),
        embed_dim=256,
        tokenizer=source.tokenizer,
    )
    objectives = {"itc": ITCObjective, "itm": ITMObjective, "mlm": MLMObjective}
    module = MultiTaskModule(backbone, objectives, mode="joint")
    dataset = source.dataset("train")
    rank = dist.get_rank()
    batch = source.collate([dataset[i] for i in range(2 * rank, 2 * rank + 2)])
    return module, batch


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _torch_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return _nbytes(
        _local(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)
    )


def _step_torch(module, batch, strategy: str) -> dict[str, int]:
    """DDP or FSDP2, fp32: one AdamW step; bytes of params, grads, optimizer state held by this rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.nn.parallel import DistributedDataParallel

    from vlp.platform.distributed.parallelize import apply_fsdp

    if strategy == "fsdp2":
        apply_fsdp(module, init_device_mesh("cpu", (WORLD,), mesh_dim_names=("data_parallel",)))
        step = module.training_step
    else:
        wrapped = DistributedDataParallel(module, find_unused_parameters=True)
        step = lambda b, i: wrapped(b, i)  # noqa: E731
        module.forward = module.training_step
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    out = step(batch, 0)
    (out["loss"] if isinstance(out, dict) else out).backward()
    optimizer.step()
    params = list(module.parameters())
    return {
        "params": _nbytes(_local(p) for p in params),
        "grads": _nbytes(_local(p.grad) for p in params if p.grad is not None),
        "optimizer": _torch_state_bytes(optimizer),
    }


def _step_deepspeed(module, batch, stage: int) -> dict[str, int]:
    """ZeRO-2/3 in bf16 through DeepSpeed directly (the platform's modules, DeepSpeed's engine)."""
    import deepspeed
    from deepspeed.runtime.zero import register_external_parameter

    from vlp.platform.distributed.deepspeed_zero import read_outside_forward
    from vlp.platform.distributed.scalar_parameters import store_scalars_as_vectors

    config = {
        "train_micro_batch_size_per_gpu": 2,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    }
    store_scalars_as_vectors(module)  # as DeepSpeedStrategy does: DeepSpeed cannot broadcast a 0-d parameter
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    module.forward = module.training_step
    engine, ds_optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    if stage == 3:
        for param in read_outside_forward(module):
            register_external_parameter(module, param)
    batch = {k: v.bfloat16() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    out = engine(batch, 0)
    engine.backward(out["loss"] if isinstance(out, dict) else out)
    # bytes counted before the step releases the gradient partitions
    if stage == 3:
        params = _nbytes(p.ds_tensor for p in module.parameters())
        grads = _nbytes([ds_optimizer.grad_partitions_flat_buffer])  # this rank's gradient partitions
        master = _nbytes(ds_optimizer.fp32_partitioned_groups_flat)
    else:
        params = _nbytes(module.parameters())
        grads = _nbytes(g for group in ds_optimizer.averaged_gradients.values() for g in group)
        master = _nbytes(ds_optimizer.single_partition_of_fp32_groups)
    engine.step()
    return {
        "params": params,
        "grads": grads,
        "optimizer": master + _torch_state_bytes(ds_optimizer.optimizer),
    }


def _measure(rank: int, strategy: str, quick: bool, out_dir: str) -> None:
    """One step under `strategy` on this rank; its counts to `out_dir`/<strategy>-<rank>.json."""
    module, batch = _model(quick)
    psi = sum(p.numel() for p in module.parameters())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if strategy.startswith("zero"):
        counts = _step_deepspeed(module, batch, int(strategy[-1]))
    else:
        counts = _step_torch(module, batch, strategy)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    (Path(out_dir) / f"{strategy}-{rank}.json").write_text(json.dumps({**counts, "psi": psi, "peak": peak}))
    dist.barrier()


def _worker(rank: int, strategies: list[str], quick: bool, out_dir: str) -> None:
    """One rank: `strategies` in turn in one process group (the real run passes one: peaks need fresh ones)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{Path(out_dir) / 'rendezvous'}", rank=rank, world_size=WORLD
    )
    try:
        for strategy in strategies:
            _measure(rank, strategy, quick, out_dir)
    finally:
        dist.destroy_process_group()


def _spawn(strategies: list[str], quick: bool) -> dict[str, list[dict]]:
    """Each rank's counts per strategy, from one pair of fresh processes running `strategies` in turn."""
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MASTER_PORT"] = str(29500 + STRATEGIES.index(strategies[0]))
        mp.spawn(_worker, args=(strategies, quick, tmp), nprocs=WORLD, join=True)
        return {
            strategy: [json.loads((Path(tmp) / f"{strategy}-{r}.json").read_text()) for r in range(WORLD)]
            for strategy in strategies
        }


def formula_bytes(strategy: str, psi: int, n: int = WORLD) -> float:
    """The ZeRO paper's per-rank bytes of model states for mixed-precision Adam (fp32 Adam for DDP/FSDP2)."""
    return {"ddp": 16 * psi, "fsdp2": 16 * psi / n, "zero2": 2 * psi + 14 * psi / n, "zero3": 16 * psi / n}[
        strategy
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a small backbone (~2 min: two fresh processes per strategy)"
    )
    parser.add_argument("--strategies", nargs="+", default=STRATEGIES, choices=STRATEGIES)
    add_smoke_flag(parser)
    args = parser.parse_args()
    # each strategy in its own 2 fresh processes (a peak RSS is per process); smoke: the quick backbone and
    # every strategy in one pair of processes, as a fresh pair per strategy costs ~20-35 s of start-up
    if args.smoke:
        results = _spawn(args.strategies, quick=True)
    else:
        results = {}
        for strategy in args.strategies:
            results |= _spawn([strategy], args.quick)
    rows = []
    for strategy in args.strategies:
        ranks = results[strategy]
        counts = {key: max(rank[key] for rank in ranks) for key in ("params", "grads", "optimizer", "peak")}
        psi = ranks[0]["psi"]
        states = counts["params"] + counts["grads"] + counts["optimizer"]
        rows.append(
            {
                "strategy": strategy,
                "params_GiB": counts["params"] / GIB,
                "grads_GiB": counts["grads"] / GIB,
                "optimizer_GiB": counts["optimizer"] / GIB,
                "states_GiB": states / GIB,
                "formula_GiB": formula_bytes(strategy, psi) / GIB,
                "bytes_per_param": states / psi,
                "peak_step_GiB": counts["peak"] / GIB,
            }
        )
    report(
        "memory_quick" if args.quick else "memory",  # a quick run keeps the full run's file
        rows,
        {"psi_params": ranks[0]["psi"], "ranks": WORLD, "batch_per_rank": 2},
        smoke=args.smoke,
    )


if __name__ == "__main__":
    main()
