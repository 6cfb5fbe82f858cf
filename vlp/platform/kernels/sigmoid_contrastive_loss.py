"""SigLIP's pairwise sigmoid loss, tiled so memory grows with B instead of B x B.

Every image-text pair is its own binary problem: with logits l_ij = scale * <x_i, y_j> + bias and labels
z_ij = +1 for a positive pair, -1 otherwise,

    L = 1/M sum_ij -log sigmoid(z_ij l_ij) = 1/M [ sum_ij softplus(l_ij) - sum_{(i,j) positive} l_ij ],

since -log sigmoid(-l) = softplus(l) and -log sigmoid(l) = softplus(l) - l. The first sum runs over all
M x K pairs and is computed in [tile, tile] blocks by an autograd Function that keeps nothing between its
passes but the inputs: the backward recomputes each block and turns sigmoid(l_ij) (d softplus / d l) into
the embedding, scale and bias gradients. The second sum touches only the P positive pairs (the diagonal by
default, plus duplicates a caller lists), in plain autograd, O(P D).

Routes: Triton kernels on CUDA tensors (block gradients added atomically, so gradient bits are not
run-to-run deterministic on GPU); tiled PyTorch elsewhere. Accumulation in fp32 (fp64 for fp64 inputs on the
PyTorch route, which the reference tests use).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp.platform.kernels._triton import Backend, dot_precision, tl, triton, use_triton

_BLOCK_M, _BLOCK_K, _BLOCK_D = 64, 64, 64
_DEFAULT_TILE = 2048

if triton is not None:
    from vlp.platform.kernels._triton import add_tile_gradients, similarity_tile

    @triton.jit
    def _softplus_rows_kernel(
        x_ptr, y_ptr, scale_ptr, bias_ptr, out_ptr, M, K, D, stride_x, stride_y,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        scale = tl.load(scale_ptr)
        bias = tl.load(bias_ptr)
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_mask = cols < K
            raw = similarity_tile(
                x_ptr, y_ptr, rows, cols, row_mask, col_mask, D, stride_x, stride_y,
                BLOCK_M, BLOCK_K, BLOCK_D, PRECISION,
            )  # fmt: skip
            logits = raw * scale + bias
            softplus = tl.maximum(logits, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(logits)))
            total += tl.sum(tl.where(col_mask[None, :], softplus, 0.0), axis=1)
        tl.store(out_ptr + rows, total, mask=row_mask)

    @triton.jit
    def _sigmoid_backward_kernel(
        a_ptr, b_ptr, scale_ptr, bias_ptr, grad_a_ptr, grad_b_ptr, grad_scale_ptr, grad_bias_ptr,
        M, K, D, stride_a, stride_b,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        row_mask = rows < M
        col_mask = cols < K
        scale = tl.load(scale_ptr)
        bias = tl.load(bias_ptr)
        raw = similarity_tile(
            a_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_a, stride_b,
            BLOCK_M, BLOCK_K, BLOCK_D, PRECISION,
        )  # fmt: skip
        grad = tl.sigmoid(raw * scale + bias)  # d softplus(l) / d l
        grad = tl.where(row_mask[:, None] & col_mask[None, :], grad, 0.0)
        block = pid_m * tl.num_programs(1) + pid_k
        tl.store(grad_scale_ptr + block, tl.sum(grad * raw))
        tl.store(grad_bias_ptr + block, tl.sum(grad))
        grad *= scale
        add_tile_gradients(
            grad, a_ptr, b_ptr, grad_a_ptr, grad_b_ptr, rows, cols, row_mask, col_mask, D, stride_a, stride_b,
            BLOCK_D, PRECISION,
        )  # fmt: skip


def _triton_softplus_sum(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    rows = torch.empty(a.shape[0], device=a.device, dtype=torch.float32)
    _softplus_rows_kernel[(triton.cdiv(a.shape[0], _BLOCK_M),)](
        a, b, scale, bias, rows, a.shape[0], b.shape[0], a.shape[1], a.stride(0), b.stride(0),
        BLOCK_M=_BLOCK_M, BLOCK_K=_BLOCK_K, BLOCK_D=_BLOCK_D, PRECISION=dot_precision(a.dtype),
    )  # fmt: skip
    return rows.sum()


def _triton_grads(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    m, d = a.shape
    grad_a = torch.zeros(m, d, device=a.device, dtype=torch.float32)
    grad_b = torch.zeros(b.shape, device=a.device, dtype=torch.float32)
    grid = (triton.cdiv(m, _BLOCK_M), triton.cdiv(b.shape[0], _BLOCK_K))
    grad_scale = torch.empty(grid[0] * grid[1], device=a.device, dtype=torch.float32)
    grad_bias = torch.empty_like(grad_scale)
    _sigmoid_backward_kernel[grid](
        a, b, scale, bias, grad_a, grad_b, grad_scale, grad_bias, m, b.shape[0], d, a.stride(0), b.stride(0),
        BLOCK_M=_BLOCK_M, BLOCK_K=_BLOCK_K, BLOCK_D=_BLOCK_D, PRECISION=dot_precision(a.dtype),
    )  # fmt: skip
    return grad_a, grad_b, grad_scale.sum(), grad_bias.sum()


def _torch_softplus_sum(a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, tile: int) -> Tensor:
    total = torch.zeros((), device=a.device, dtype=a.dtype)
    for i in range(0, a.shape[0], tile):
        for j in range(0, b.shape[0], tile):
            logits = (a[i : i + tile] @ b[j : j + tile].T).mul_(scale).add_(bias)
            total += F.softplus(logits).sum()
    return total


def _torch_grads(
    a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, tile: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grad_a, grad_b = torch.zeros_like(a), torch.zeros_like(b)
    grad_scale = torch.zeros((), device=a.device, dtype=a.dtype)
    grad_bias = torch.zeros_like(grad_scale)
    for i in range(0, a.shape[0], tile):
        for j in range(0, b.shape[0], tile):
            raw = a[i : i + tile] @ b[j : j + tile].T
            grad = (raw * scale).add_(bias).sigmoid_()
            grad_scale += torch.vdot(grad.flatten(), raw.flatten())
            grad_bias += grad.sum()
            grad.mul_(scale)
            grad_a[i : i + tile].addmm_(grad, b[j : j + tile])
            grad_b[j : j + tile].addmm_(grad.T, a[i : i + tile])
    return grad_a, grad_b, grad_scale, grad_bias


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _SoftplusSum(torch.autograd.Function):
    """sum_ij softplus(scale * a [M, D] @ b [K, D].T + bias), without keeping any [M, K] block."""

    @staticmethod
    def forward(
        ctx, a: Tensor, b: Tensor, scale: Tensor, bias: Tensor, tile: int, use_triton: bool
    ) -> Tensor:
        acc = _accumulation_dtype(a.dtype)
        if use_triton:
            total = _triton_softplus_sum(a, b, scale.float(), bias.float())
        else:
            total = _torch_softplus_sum(a.to(acc), b.to(acc), scale.to(acc), bias.to(acc), tile)
        ctx.save_for_backward(a, b, scale, bias)
        ctx.tile, ctx.use_triton = tile, use_triton
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        a, b, scale, bias = ctx.saved_tensors
        if ctx.use_triton:
            grad_a, grad_b, grad_scale, grad_bias = _triton_grads(a, b, scale.float(), bias.float())
        else:
            acc = _accumulation_dtype(a.dtype)
            grad_a, grad_b, grad_scale, grad_bias = _torch_grads(
                a.to(acc), b.to(acc), scale.to(acc), bias.to(acc), ctx.tile
            )
        g = grad_output.to(grad_a.dtype)
        return (
            (grad_a * g).to(a.dtype),
            (grad_b * g).to(b.dtype),
            (grad_scale * g).to(scale.dtype),
            (grad_bias * g).to(bias.dtype),
            None,
            None,
        )


def _check_inputs(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, chunk_size: int | None) -> None:
    if image.dim() != 2 or text.dim() != 2 or image.shape[1] != text.shape[1]:
        raise ValueError(
            f"image and text must be [M, D] and [K, D], got {tuple(image.shape)}, {tuple(text.shape)}"
        )
    if image.shape[0] == 0 or text.shape[0] == 0:
        raise ValueError("sigmoid_contrastive_loss needs at least one image and one text, got an empty batch")
    for name, value in (("scale", scale), ("bias", bias)):
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(f"{name} must be a one-element tensor, got {value!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    if image.dtype != text.dtype or not image.is_floating_point():
        raise TypeError(f"embeddings must share a floating dtype, got {image.dtype} and {text.dtype}")


def sigmoid_contrastive_loss(
    image: Tensor,
    text: Tensor,
    scale: Tensor,
    bias: Tensor,
    chunk_size: int | None = None,
    *,
    positives: Tensor | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """SigLIP's loss of images [M, D] against texts [K, D]: 1/M sum_ij -log sigmoid(z_ij (scale <x_i, y_j> +
    bias)), z_ij = +1 at `positives`, -1 elsewhere (module docstring). Never builds the [M, K] logits.

    image, text: L2-normalised embeddings; scale (already exp'ed) and bias: one-element tensors, both
    receive gradients. `positives`: [P, 2] (image row, text column) index pairs, each listed once; None is
    the diagonal (M == K), an empty [0, 2] a block of negatives only (another rank's texts). `chunk_size`:
    tile edge of the PyTorch route (default 2048); the Triton route tiles at fixed block sizes. `backend`:
    "auto" (Triton on CUDA tensors when installed), "triton" (CPU tensors need TRITON_INTERPRET=1) or
    "torch". Returns a 0-dim loss, fp32 (fp64 for fp64 inputs).
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    _check_inputs(image, text, scale, bias, chunk_size)
    m, k = image.shape[0], text.shape[0]
    if positives is None:
        if m != k:
            raise ValueError(f"the default diagonal positives need as many images as texts, got {m} and {k}")
        rows = cols = torch.arange(m, device=image.device)
    else:
        if positives.dim() != 2 or positives.shape[1] != 2:
            raise ValueError(f"positives must be [P, 2] index pairs, got {tuple(positives.shape)}")
        rows, cols = positives[:, 0], positives[:, 1]
    device_type = image.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        image, text = image.to(dtype), text.to(dtype)
    on_triton = use_triton(backend, image) and image.dtype != torch.float64
    acc = _accumulation_dtype(image.dtype)
    scale, bias = scale.reshape(()), bias.reshape(())
    image, text = image.contiguous(), text.contiguous()
    with torch.autocast(device_type, enabled=False):
        every_pair = _SoftplusSum.apply(image, text, scale, bias, chunk_size or _DEFAULT_TILE, on_triton)
        positive_logits = scale.to(acc) * (image[rows].to(acc) * text[cols].to(acc)).sum() + bias.to(
            acc
        ) * len(rows)
        return (every_pair - positive_logits) / m


def sigmoid_contrastive_loss_reference(
    image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, positive_mask: Tensor | None = None
) -> Tensor:
    """Naive computation with the full [M, K] logits: 1/M sum -logsigmoid(z * logits); `positive_mask`
    [M, K] bool (default the diagonal)."""
    logits = scale * image @ text.T + bias
    if positive_mask is None:
        positive_mask = torch.eye(image.shape[0], text.shape[0], dtype=torch.bool, device=image.device)
    labels = positive_mask.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]
