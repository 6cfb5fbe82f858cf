"""Memory and time of the fused kernels against the naive PyTorch computation, forward + backward.

- Vocabulary head: V=30522, H=768, 8192 tokens, fp32. Goal: >= 8x less peak memory, time within 1.3x.
- Contrastive loss: B = 1k..16k, D=256. Goal: peak memory growth exponent (log-log fit) <= 1.1 tiled, ~2 naive.
Each measurement runs in a fresh process (peak RSS growth); the route is the one `backend="auto"` picks on
the benchmark's device (PyTorch on CPU, Triton on CUDA). Results: benchmarks/results/kernels.json.

    python benchmarks/kernels.py
    python benchmarks/kernels.py --smoke    # every measurement at the smallest sizes, seconds: checks it runs
"""

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import add_smoke_flag, median_seconds, peak_rss_growth_mib, report, run_isolated

from vlp.platform.kernels import (
    contrastive_loss,
    contrastive_loss_reference,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

HEAD = dict(tokens=8192, vocab=30522, hidden=768)
BATCHES = [1024, 2048, 4096, 8192, 16384]
EMBED_DIM = 256
# --smoke: the smallest sizes whose loss + backward still raise the peak RSS (the ratios and the fit divide by
# it; below these the growth can be 0), two batches for the fit
SMOKE_HEAD = dict(tokens=512, vocab=4096, hidden=64)
SMOKE_BATCHES = [256, 512]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _peak_mib(step) -> float:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return peak_rss_growth_mib(step)


def _sync_step(step):
    def run():
        step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    return run


def measure_head(method: str, tokens: int, vocab: int, hidden: int, repeat: int) -> dict:
    """Peak memory and median time of loss + backward for the vocabulary head (run in a fresh process)."""
    device, gen = _device(), torch.Generator().manual_seed(0)
    fn = linear_cross_entropy if method == "fused" else linear_cross_entropy_reference

    def inputs(n, v, h):
        hid = torch.randn(n, h, generator=gen).to(device).requires_grad_()
        w = (torch.randn(v, h, generator=gen) / h**0.5).to(device).requires_grad_()
        return hid, w, torch.randint(0, v, (n,), generator=gen).to(device)

    small = inputs(64, 512, 32)
    fn(*small).backward()  # warm-up: thread pools and kernels initialised before the baseline
    hid, w, target = inputs(tokens, vocab, hidden)

    def step():
        hid.grad = w.grad = None
        fn(hid, w, target).backward()

    step = _sync_step(step)
    return {"peak_mib": _peak_mib(step), "seconds": median_seconds(step, repeat)}


def measure_contrastive(method: str, batch: int, dim: int, repeat: int) -> dict:
    """Peak memory and median time of loss + backward for the contrastive loss (run in a fresh process)."""
    device, gen = _device(), torch.Generator().manual_seed(0)
    fn = contrastive_loss if method == "tiled" else contrastive_loss_reference

    def inputs(b, d):
        image = F.normalize(torch.randn(b, d, generator=gen), dim=-1).to(device).requires_grad_()
        text = F.normalize(torch.randn(b, d, generator=gen), dim=-1).to(device).requires_grad_()
        return image, text, torch.tensor(14.0, device=device, requires_grad=True)

    fn(*inputs(64, dim)).backward()
    image, text, scale = inputs(batch, dim)

    def step():
        image.grad = text.grad = scale.grad = None
        fn(image, text, scale).backward()

    step = _sync_step(step)
    return {"peak_mib": _peak_mib(step), "seconds": median_seconds(step, repeat)}


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x): the growth exponent."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_smoke_flag(parser)
    args = parser.parse_args()
    sizes, batches = (SMOKE_HEAD, SMOKE_BATCHES) if args.smoke else (HEAD, BATCHES)
    script = Path(__file__).resolve()
    rows, summary = [], {}
    head = {m: run_isolated(script, "measure_head", method=m, repeat=1, **sizes) for m in ("naive", "fused")}
    for method, result in head.items():
        rows.append({"bench": "vocab_head", "method": method, "size": sizes["tokens"], **result})
    summary["head_memory_ratio"] = head["naive"]["peak_mib"] / head["fused"]["peak_mib"]
    summary["head_time_ratio"] = head["fused"]["seconds"] / head["naive"]["seconds"]

    peaks = {"naive": [], "tiled": []}
    for batch in batches:
        for method in peaks:
            result = run_isolated(
                script,
                "measure_contrastive",
                method=method,
                batch=batch,
                dim=EMBED_DIM,
                repeat=1,
            )
            peaks[method].append(result["peak_mib"])
            rows.append({"bench": "contrastive", "method": method, "size": batch, **result})
    for method, values in peaks.items():
        summary[f"contrastive_{method}_memory_exponent"] = loglog_slope(batches, values)
    report("kernels", rows, summary, smoke=args.smoke)


if __name__ == "__main__":
    main()
