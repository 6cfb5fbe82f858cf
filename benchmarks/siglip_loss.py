"""Per-rank peak memory and time of the contrastive losses alone (forward + backward): SigLIP's sigmoid loss
tiled (vlp) and untiled (the naive reference), open_clip's `SigLipLoss`, and InfoNCE tiled and untiled, at
B = 256 ... 8192, D = 256, on one process and on 2 gloo ranks (B the global batch, B / 2 per rank; the
sigmoid losses exchange texts around the ring, InfoNCE gathers). Each measurement runs in fresh processes
(peak RSS growth on CPU, peak allocation on CUDA) and the methods are interleaved per size. Results:
benchmarks/results/siglip_loss.json.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/siglip_loss.py [--batches 256 1024 4096 8192] [--ranks 1 2]
    python benchmarks/siglip_loss.py --smoke    # every measurement at the smallest sizes, seconds: checks it runs
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from harness import add_smoke_flag, median_seconds, peak_rss_growth_mib, report, run_isolated
from open_clip.loss import SigLipLoss

from vlp.platform.kernels import (
    contrastive_loss,
    contrastive_loss_reference,
    sigmoid_contrastive_loss_reference,
)
from vlp.platform.losses import sigmoid_loss

METHODS = ("sigmoid_tiled", "sigmoid_untiled", "open_clip_siglip", "infonce_tiled", "infonce_untiled")
EMBED_DIM, CHUNK = 256, 1024
SMOKE_BATCH = 8  # --smoke's one global batch (4 a rank on 2)
SCRIPT = Path(__file__).resolve()  # runpy.run_path sets __file__ too


def _loss_fn(method: str, rank: int, world: int):
    if method == "sigmoid_tiled":
        return lambda i, t, s, b: sigmoid_loss(i, t, s, b, chunk_size=CHUNK)
    if method == "sigmoid_untiled":
        if world > 1:
            return None  # the naive reference is single-process
        return sigmoid_contrastive_loss_reference
    if method == "open_clip_siglip":
        return SigLipLoss(rank=rank, world_size=world, dist_impl="bidir")
    if method == "infonce_tiled":
        return lambda i, t, s, b: contrastive_loss(i, t, s, CHUNK)
    if world > 1:
        return None
    return lambda i, t, s, b: contrastive_loss_reference(i, t, s)


def _measure(method: str, local_batch: int, rank: int, world: int, repeat: int) -> dict:
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    fn = _loss_fn(method, rank, world)
    gen = torch.Generator().manual_seed(rank)

    def inputs(b):
        image = F.normalize(torch.randn(b, EMBED_DIM, generator=gen), dim=-1).to(device).requires_grad_()
        text = F.normalize(torch.randn(b, EMBED_DIM, generator=gen), dim=-1).to(device).requires_grad_()
        scale = torch.tensor(10.0, device=device, requires_grad=True)
        return image, text, scale, torch.tensor(-10.0, device=device, requires_grad=True)

    fn(*inputs(8)).backward()  # warm-up: thread pools and kernels initialised before the baseline
    image, text, scale, bias = inputs(local_batch)

    def step():
        image.grad = text.grad = scale.grad = bias.grad = None
        fn(image, text, scale, bias).backward()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = peak_rss_growth_mib(step)
    return {"peak_mib": peak, "seconds": median_seconds(step, repeat)}


def _rank_main(rank: int, world: int, folder: str, methods: list[str], local_batch: int, repeat: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    result = {method: _measure(method, local_batch, rank, world, repeat) for method in methods}
    Path(folder, f"{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    os._exit(0)


def measure_methods(methods: list[str], batch: int, world: int, repeat: int) -> dict[str, dict]:
    """Peak memory (the largest rank's) and median time of one loss + backward of each of `methods` (those that
    run on `world` ranks), one after another in the same processes: one per rank, each this script with
    `--rank`. The real run passes one method (a peak is then its own), --smoke all (fewer processes)."""
    methods = [method for method in methods if _loss_fn(method, 0, world) is not None]
    if not methods:
        return {}
    if world == 1:
        torch.set_num_threads(1)
        return {method: _measure(method, batch, 0, 1, repeat) for method in methods}
    with tempfile.TemporaryDirectory() as folder:
        ranks = [
            subprocess.Popen(
                [sys.executable, str(SCRIPT), "--rank", str(r), "--world", str(world), "--folder", folder]
                + ["--method", *methods, "--batches", str(batch // world), "--repeat", str(repeat)]
            )
            for r in range(world)
        ]
        if any(p.wait(timeout=600) != 0 for p in ranks):
            raise RuntimeError(f"a rank of {methods} at batch {batch} failed")
        results = [json.loads(Path(folder, f"{r}.json").read_text()) for r in range(world)]
    return {
        method: {key: max(r[method][key] for r in results) for key in ("peak_mib", "seconds")}
        for method in methods
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--rank", type=int, help=argparse.SUPPRESS)  # one rank of a multi-rank measurement
    parser.add_argument("--world", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--method", nargs="+", help=argparse.SUPPRESS)
    add_smoke_flag(parser)
    args = parser.parse_args()
    if args.rank is not None:
        _rank_main(args.rank, args.world, args.folder, args.method, args.batches[0], args.repeat)
    script = Path(__file__).resolve()
    # each method in fresh processes of its own (a peak is then its own); --smoke: one small batch, a world's
    # methods sharing their processes
    batches, groups = (
        ([SMOKE_BATCH], [list(METHODS)]) if args.smoke else (args.batches, [[m] for m in METHODS])
    )
    rows = []
    for world in args.ranks:
        for batch in batches:
            for methods in groups:
                results = run_isolated(
                    script, "measure_methods", methods=methods, batch=batch, world=world, repeat=args.repeat
                )
                for method, result in results.items():
                    rows.append({"ranks": world, "batch": batch, "method": method, **result})
                    print(rows[-1], flush=True)
    assert {row["ranks"] for row in rows} == set(args.ranks), "a world size measured nothing"
    report("siglip_loss", rows, smoke=args.smoke)


if __name__ == "__main__":
    main()
