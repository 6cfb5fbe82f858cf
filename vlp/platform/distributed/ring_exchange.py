"""Neighbour exchange around the ring of ranks, with gradients, for losses that visit every rank's rows one
block at a time instead of gathering them all (SigLIP's sigmoid loss, open_clip's `dist_impl="shift"` and
`"bidir"`).

Rank r sends to r + 1 ("right") and receives from r - 1 ("left"), modulo W. The backward sends each received
tensor's gradient back the way it came, so the rank that owns a row gets the gradient every other rank's
loss put on it: with per-rank losses averaged by DDP that is the single-process gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from vlp.platform.distributed.collectives import rank, world_size


def neighbours() -> tuple[int, int]:
    """(left, right): the ranks this one receives from and sends to in a forward shift."""
    w, r = world_size(), rank()
    return (r - 1) % w, (r + 1) % w


def _send_receive(sends: list[tuple[Tensor, int]], receives: list[tuple[Tensor, int]]) -> None:
    """Point-to-point sends and receives posted together, so a ring of ranks cannot deadlock."""
    ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in receives]
    for request in dist.batch_isend_irecv(ops):
        request.wait()


def _shift(tensor: Tensor, to: int, source: int) -> Tensor:
    received = torch.empty_like(tensor)
    _send_receive([(tensor.contiguous(), to)], [(received, source)])
    return received


class _ShiftRight(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        ctx.left, ctx.right = neighbours()
        return _shift(tensor, ctx.right, ctx.left)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _shift(grad, ctx.left, ctx.right)


class _ShiftBothWays(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, to_left: Tensor, to_right: Tensor) -> tuple[Tensor, Tensor]:
        ctx.left, ctx.right = left, right = neighbours()
        from_left, from_right = torch.empty_like(to_right), torch.empty_like(to_left)
        _send_receive(
            [(to_left.contiguous(), left), (to_right.contiguous(), right)],
            [(from_left, left), (from_right, right)],
        )
        return from_left, from_right

    @staticmethod
    def backward(ctx: Any, grad_from_left: Tensor, grad_from_right: Tensor) -> tuple[Tensor, Tensor]:
        grad_to_left, grad_to_right = torch.empty_like(grad_from_right), torch.empty_like(grad_from_left)
        _send_receive(
            [(grad_from_left.contiguous(), ctx.left), (grad_from_right.contiguous(), ctx.right)],
            [(grad_to_left, ctx.left), (grad_to_right, ctx.right)],
        )
        return grad_to_left, grad_to_right


def shift_right(tensor: Tensor) -> Tensor:
    """The left neighbour's `tensor` [B, ...] (this rank's goes to the right one), differentiably. Every rank
    must pass the same shape and dtype."""
    return _ShiftRight.apply(tensor)


def shift_both_ways(to_left: Tensor, to_right: Tensor) -> tuple[Tensor, Tensor]:
    """Send `to_left` left and `to_right` right in one round; returns (from the left neighbour, from the right
    neighbour), differentiably. Two blocks travel per round, so W - 1 blocks arrive in about W / 2 rounds."""
    return _ShiftBothWays.apply(to_left, to_right)
