"""Rank helpers and an all-gather that keeps gradients, for losses that score against the global batch.

A plain `torch.distributed.all_gather` cuts the graph, so a contrastive loss computed on gathered features
would only push gradients into the local rows. `all_gather_with_grad` keeps it: its
backward sums each slice's gradient over ranks, so with per-rank losses averaged by DDP the result equals
the single-process gradient on the whole batch. `all_gather_many` gathers several tensors in one collective.
"""

import atexit
import functools
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

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


class _GatherRows(torch.autograd.Function):
    """all_gather of a [B, F] tensor -> [W * B, F] in one collective each way: the backward sums each rank's
    slice of the gradient over ranks with a reduce-scatter (NCCL, XCCL) or an all-reduce and a slice (gloo
    has no reduce-scatter; torch's own differentiable all_gather emulates one there by W scatters)."""

    @staticmethod
    def forward(ctx: Any, flat: Tensor) -> Tensor:
        parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, flat)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        rows = grad.shape[0] // dist.get_world_size()
        if dist.get_backend() in (dist.Backend.NCCL, dist.Backend.XCCL):
            out = grad.new_empty((rows, *grad.shape[1:]))
            dist.reduce_scatter_tensor(out, grad.contiguous())
            return out
        summed = grad.contiguous().clone()
        dist.all_reduce(summed)
        return summed[dist.get_rank() * rows : (dist.get_rank() + 1) * rows]


def all_gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate `t` [B, ...] from every rank along dim 0 -> [world_size * B, ...], differentiably: the
    backward gives each rank the sum over ranks of its rows' gradients.

    Every rank must pass the same shape. Identity when not distributed.
    """
    return all_gather_many([t], with_grad=True)[0]


def all_gather_many(tensors: Sequence[Tensor], with_grad: bool = False) -> list[Tensor]:
    """`all_gather_with_grad` (or, without `with_grad`, a detached gather) of several tensors that share
    their row count B, in one collective per dtype instead of one each: a step that gathers a dozen
    feature tensors (ITM: captions, every fusion layer's image keys and values) waits on the other ranks
    once, not a dozen times. Each result is [world_size * B, ...] in rank order. Identity when not
    distributed; every rank must pass the same shapes."""
    if not is_distributed():
        return list(tensors)
    rows = {t.shape[0] for t in tensors}
    if len(rows) > 1:
        raise ValueError(f"all_gather_many needs tensors with one row count, got {sorted(rows)}")
    out: list[Tensor | None] = [None] * len(tensors)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        members = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flats = [tensors[i].reshape(tensors[i].shape[0], -1) for i in members]
        packed = torch.cat(flats, dim=1) if len(flats) > 1 else flats[0].contiguous()
        gathered = _GatherRows.apply(packed if with_grad else packed.detach())
        for i, piece in zip(members, gathered.split([f.shape[1] for f in flats], dim=1), strict=True):
            out[i] = piece.reshape(-1, *tensors[i].shape[1:])
    return out  # type: ignore[return-value]


def decide_over_ranks(decision: bool, all: bool = True, device: torch.device | str = "cpu") -> bool:
    """`all` (else `any`) of every rank's `decision`, in one all-reduce. Lightning's own
    `reduce_boolean_decision` puts a barrier before its all-reduce: a second point a step where each rank
    waits for the slowest, for the non-finite guard's decision of every optimizer step. `device`: where the
    backend reduces (CUDA for NCCL). `decision` when not distributed."""
    if not is_distributed():
        return decision
    votes = torch.tensor(int(decision), device=device)
    dist.all_reduce(votes)
    return int(votes) == dist.get_world_size() if all else int(votes) > 0


def pad_to(t: Tensor, dim: int, length: int) -> Tensor:
    """`t` zero-padded at the end of dimension `dim` to `length`."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    pad = [0, 0] * (t.ndim - 1 - dim % t.ndim) + [0, missing]
    return torch.nn.functional.pad(t, pad)


def all_gather_objects(value: object) -> list[object]:
    """Every rank's picklable `value`, in rank order (`[value]` when not distributed); a collective, so
    every rank calls it at the same point."""
    if not is_distributed():
        return [value]
    values: list[object] = [None] * world_size()
    dist.all_gather_object(values, value)
    return values
