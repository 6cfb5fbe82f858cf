"""What both kernels share: the optional triton import and the choice of route."""

import os
from typing import Literal

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

Backend = Literal["auto", "triton", "torch"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in {"1", "true", "on", "yes"}


def use_triton(backend: str, tensor: Tensor) -> bool:
    """Triton on CUDA tensors when installed ("auto"); "triton" on CPU only under TRITON_INTERPRET=1."""
    if backend == "torch":
        return False
    if backend == "triton":
        if triton is None:
            raise RuntimeError("backend='triton' needs the `triton` package (pip install 'vlp[triton]')")
        if not tensor.is_cuda and not INTERPRET:
            raise ValueError("backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before import")
        return True
    return triton is not None and tensor.is_cuda


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's TF32 switch (off by default), so results match a torch matmul; the fp32
    products of 16-bit inputs in the backward use TF32, which keeps the fp32 range of tiny probabilities."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


if triton is not None:

    @triton.jit
    def load_tile(ptr, rows, ks, stride, row_mask, k_mask):
        """The [rows, ks] tile of a row-major matrix with row stride `stride`, zero outside the masks."""
        return tl.load(
            ptr + rows[:, None] * stride + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0
        )
