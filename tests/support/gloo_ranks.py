"""Run a test function on N CPU ranks (gloo, spawned processes), for checks that compare ranks with one process.

Each rank joins a process group through a file rendezvous in `out_dir` (a probed "free" TCP port can be
taken by a concurrent run), runs `fn(rank, out_dir, *args)`, which writes its results under `out_dir`,
and waits at a barrier. It then leaves with `os._exit(0)` instead of tearing the group down: gloo's
teardown aborts a process now and then ("terminate called without an active exception", SIGABRT) while
its peer still holds the connection, after the results are already on disk. An exception in `fn` still
reaches the test through `torch.multiprocessing.spawn`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp


def run_on_ranks(fn: Callable[..., None], out_dir: str | Path, *args: object, world: int = 2) -> None:
    """Call `fn(rank, str(out_dir), *args)` on `world` gloo ranks and wait for all of them."""
    mp.spawn(_rank_main, args=(fn, str(out_dir), world, args), nprocs=world, join=True)


def _rank_main(rank: int, fn: Callable[..., None], out_dir: str, world: int, args: tuple) -> None:
    rendezvous = f"file://{Path(out_dir) / 'rendezvous'}"
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    fn(rank, out_dir, *args)
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
