"""Rank helpers and an all-gather that keeps gradients, for losses that score against the global batch.

A plain `torch.distributed.all_gather` cuts the graph, so a contrastive loss computed on gathered features
would only push gradients into the local rows. `all_gather_with_grad` uses
`torch.distributed.nn.functional.all_gather`, whose backward sums each slice's gradient over ranks: with
per-rank losses averaged by DDP, the result equals the single-process gradient on the whole batch.
"""

import atexit
import functools
import logging
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import Tensor


@functools.cache  # registered once
def destroy_process_group_at_exit() -> None:
    """Tear the process group down at exit while Python is still whole (Lightning does it for NCCL only).

    Left to interpreter finalisation, gloo's worker threads can still hold work objects with Python
    references, and destroying them then aborts the process ("terminate called without an active
    exception", SIGABRT). This is the fallback for a run that ends with an error; a finished run ends
    through `leave_gloo_run`.
    """
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave_gloo_run() -> None:
    """End a finished multi-rank gloo run: every rank meets at a barrier, flushes, and leaves with exit
    status 0 without gloo's teardown. That teardown (an explicit destroy or interpreter finalisation) still
    aborts a process now and then after the run's checkpoints, logs and metrics are written, and Slurm then
    marks the job FAILED. Exit handlers do not run; Lightning has closed its loggers by then. No-op in one
    process or under another backend (NCCL is torn down by Lightning's own exit handler)."""
    if not is_distributed() or dist.get_backend() != "gloo":
        return
    dist.barrier()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks; 1 when not distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank; 0 when not distributed."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate `t` [B, ...] from every rank along dim 0 -> [world_size * B, ...], differentiably.

    Every rank must pass the same shape. Identity when not distributed.
    """
    if not is_distributed():
        return t
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # torch >= 2.6 marks it deprecated in favour of a private API; it is still the documented route.
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)
        return torch.cat(all_gather(t), dim=0)


def all_gather_padded(t: Tensor, pad_dim: int | None = None, with_grad: bool = False) -> Tensor:
    """Concatenate `t` [B, ...] from every rank along dim 0 -> [world_size * B, ...].

    `pad_dim` names a dimension whose size may differ between ranks (captions padded to each batch's
    longest): every rank's tensor is zero-padded there to the longest first. `with_grad` keeps the graph
    (`all_gather_with_grad`); otherwise the result is detached. Identity when not distributed.
    """
    if not is_distributed():
        return t
    if pad_dim is not None:
        longest = torch.tensor(t.shape[pad_dim], device=t.device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        missing = int(longest) - t.shape[pad_dim]
        if missing:
            pad = [0, 0] * (t.ndim - 1 - pad_dim % t.ndim) + [0, missing]
            t = torch.nn.functional.pad(t, pad)
    if with_grad:
        return all_gather_with_grad(t)
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts, dim=0)


def all_gather_objects(value: object) -> list[object]:
    """Every rank's picklable `value`, in rank order (`[value]` when not distributed); a collective, so
    every rank calls it at the same point."""
    if not is_distributed():
        return [value]
    values: list[object] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values
