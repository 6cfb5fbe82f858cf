"""FLOP counting that also sees attention on CPU.

`torch.utils.flop_counter.FlopCounterMode` has formulas for the CUDA SDPA kernels only; on CPU,
`F.scaled_dot_product_attention` dispatches `aten._scaled_dot_product_flash_attention_for_cpu` (with or
without `attn_mask`) and its backward, which it counts as 0. We add both with torch's own SDPA formulas.
The math fallback (e.g. a mask that requires grad, dropout in training, mismatched head dims) runs
plain `bmm`s, which are counted already. Gather/scatter/sort (token merging's bookkeeping) count 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, ...): q, k, v [B, H, N, D]."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    """aten._scaled_dot_product_flash_attention_for_cpu_backward(grad_out, query, key, value, out, lse, ...)."""
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_SDPA_FLOP_FORMULAS: dict[Any, Callable[..., int]] = {
    # private aten ops (torch 2.14.1, tests/test_private_apis.py): what CPU SDPA dispatches to, which
    # FlopCounterMode counts as 0
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flop,
}


def flop_counter(display: bool = False) -> FlopCounterMode:
    """A `FlopCounterMode` (use as a context manager) that also counts CPU SDPA."""
    return FlopCounterMode(display=display, custom_mapping=CPU_SDPA_FLOP_FORMULAS)


def count_flops(fn: Callable[[], Any], backward: bool = False) -> int:
    """FLOPs of calling `fn()` (and, with `backward`, of back-propagating the sum of its tensor output)."""
    counter = flop_counter()
    with counter:
        out = fn()
        if backward:
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"backward=True needs fn to return a Tensor, got {type(out).__name__}")
            out.sum().backward()
    return counter.get_total_flops()
