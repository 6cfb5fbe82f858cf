"""What the kernels share: the optional triton import, the choice of route, and the tile helpers of the
contrastive kernels (a similarity tile, and the products that carry a tile's logit gradient into both
embeddings' gradients)."""

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

    @triton.jit
    def similarity_tile(
        x_ptr, y_ptr, rows, cols, row_mask, col_mask, D, stride_x, stride_y,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """The fp32 tile x[rows] @ y[cols].T [BLOCK_M, BLOCK_K], accumulated over D in BLOCK_D slices."""
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_mask = ds < D
            x = load_tile(x_ptr, rows, ds, stride_x, row_mask, d_mask)
            y = load_tile(y_ptr, cols, ds, stride_y, col_mask, d_mask)
            acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def add_tile_gradients(
        grad, a_ptr, b_ptr, grad_a_ptr, grad_b_ptr, rows, cols, row_mask, col_mask, D, stride_a, stride_b,
        BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """grad_a[rows] += G b[cols] and grad_b[cols] += G^T a[rows] for the tile's logit gradient G
        [BLOCK_M, BLOCK_K] (fp32), atomically: other programs add into the same rows and columns."""
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            d_mask = ds < D
            b = load_tile(b_ptr, cols, ds, stride_b, col_mask, d_mask)
            a = load_tile(a_ptr, rows, ds, stride_a, row_mask, d_mask)
            tl.atomic_add(
                grad_a_ptr + rows[:, None] * D + ds[None, :],
                tl.dot(grad, b.to(tl.float32), input_precision=PRECISION),
                mask=row_mask[:, None] & d_mask[None, :],
            )
            tl.atomic_add(
                grad_b_ptr + cols[:, None] * D + ds[None, :],
                tl.dot(tl.trans(grad), a.to(tl.float32), input_precision=PRECISION),
                mask=col_mask[:, None] & d_mask[None, :],
            )
