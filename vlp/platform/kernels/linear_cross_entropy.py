"""Fused linear + cross-entropy for vocabulary heads, never holding the full [N, V] logits.

A vocabulary head over N tokens materialises N x V logits (8192 x 30522 fp32 is 1 GB) and autograd keeps
about three such tensors alive. Two routes avoid that, after Liger-Kernel's fused linear cross-entropy and
Apple's Cut Cross-Entropy (implemented from their descriptions):

- Triton (CUDA tensors): the forward kernel streams [BLOCK_N, BLOCK_V] logit tiles through an online
  log-sum-exp and keeps only the per-row log-sum-exp; the backward kernel recomputes each tile, turns it
  into the logit gradient and adds its products with `weight` and `hidden` into fp32 gradients atomically
  (so gradient bits are not run-to-run deterministic on GPU).
- PyTorch (everywhere else): rows are processed in chunks and the gradients are computed in the forward,
  as Liger does; only `grad_hidden` [N, H], `grad_weight` [V, H] and `grad_bias` [V] are kept.

Logits, log-sum-exp and gradients accumulate in fp32 for fp16/bf16 inputs; returned gradients take the
input dtypes. Under autocast the inputs are cast to the autocast dtype first, as `F.linear` would.

Under ZeRO-3 / FSDP the weight must be the gathered (unsharded) one: call `linear_cross_entropy` inside
the forward of the module that owns `weight` (e.g. the head's `forward`), never on `head.weight` from
outside it, where a sharded flat parameter would be read.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp.platform.kernels._triton import Backend, dot_precision, tl, triton, use_triton

_BLOCK_N, _BLOCK_V, _BLOCK_H = 64, 64, 64

if triton is not None:
    from vlp.platform.kernels._triton import load_tile

    @triton.jit
    def _logits_tile(
        hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_mask = ks < H
            h = load_tile(hidden_ptr, rows, ks, stride_h, row_mask, k_mask)
            w = load_tile(weight_ptr, cols, ks, stride_w, col_mask, k_mask)
            acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _lce_forward_kernel(
        hidden_ptr, weight_ptr, bias_ptr, target_ptr, lse_ptr, loss_ptr, N, V, H, stride_h, stride_w,
        ignore_index, label_smoothing,
        HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        target = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index)
        run_max = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
        target_logit = tl.zeros([BLOCK_N], dtype=tl.float32)
        logit_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < V
            logits = _logits_tile(
                hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
                HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION,
            )  # fmt: skip
            target_logit += tl.sum(tl.where(cols[None, :] == target[:, None], logits, 0.0), axis=1)
            logit_sum += tl.sum(tl.where(col_mask[None, :], logits, 0.0), axis=1)
            logits = tl.where(col_mask[None, :], logits, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(logits, axis=1))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            run_max = new_max
        lse = run_max + tl.log(run_sum)
        loss = lse - (1.0 - label_smoothing) * target_logit - label_smoothing / V * logit_sum
        loss = tl.where(target != ignore_index, loss, 0.0)
        tl.store(lse_ptr + rows, lse, mask=row_mask)
        tl.store(loss_ptr + rows, loss, mask=row_mask)

    @triton.jit
    def _lce_backward_kernel(
        hidden_ptr, weight_ptr, bias_ptr, target_ptr, lse_ptr, scale_ptr, grad_hidden_ptr, grad_weight_ptr,
        grad_bias_ptr, N, V, H, stride_h, stride_w, ignore_index, label_smoothing,
        HAS_BIAS: tl.constexpr, BIAS_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
        BLOCK_H: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        row_mask = rows < N
        col_mask = cols < V
        target = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        logits = _logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_mask, col_mask, H, stride_h, stride_w,
            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_H, PRECISION,
        )  # fmt: skip
        # d(row loss)/d(logits) = softmax - (1 - eps) * onehot(target) - eps / V, zero on ignored rows;
        # the common factor grad_output / n_valid (scale_ptr) is applied after the products.
        grad = tl.exp(logits - lse[:, None]) - label_smoothing / V
        grad -= tl.where(cols[None, :] == target[:, None], 1.0 - label_smoothing, 0.0)
        keep = (row_mask & (target != ignore_index))[:, None] & col_mask[None, :]
        grad = tl.where(keep, grad, 0.0)
        scale = tl.load(scale_ptr)
        if BIAS_GRAD:
            tl.atomic_add(grad_bias_ptr + cols, tl.sum(grad, axis=0) * scale, mask=col_mask)
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_mask = ks < H
            h = load_tile(hidden_ptr, rows, ks, stride_h, row_mask, k_mask).to(tl.float32)
            w = load_tile(weight_ptr, cols, ks, stride_w, col_mask, k_mask).to(tl.float32)
            grad_h = tl.dot(grad, w, input_precision=PRECISION) * scale
            tl.atomic_add(
                grad_hidden_ptr + rows[:, None] * H + ks[None, :],
                grad_h,
                mask=row_mask[:, None] & k_mask[None, :],
            )
            grad_w = tl.dot(tl.trans(grad), h, input_precision=PRECISION) * scale
            tl.atomic_add(
                grad_weight_ptr + cols[:, None] * H + ks[None, :],
                grad_w,
                mask=col_mask[:, None] & k_mask[None, :],
            )


def _triton_forward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, ignore_index: int, smoothing: float
) -> tuple[Tensor, Tensor]:
    """Returns per-row log-sum-exp [N] and per-row loss [N] (0 on ignored rows), both fp32."""
    n, h = hidden.shape
    v = weight.shape[0]
    lse = torch.empty(n, device=hidden.device, dtype=torch.float32)
    row_loss = torch.empty_like(lse)
    _lce_forward_kernel[(triton.cdiv(n, _BLOCK_N),)](
        hidden, weight, bias if bias is not None else hidden, target, lse, row_loss, n, v, h,
        hidden.stride(0), weight.stride(0), ignore_index, smoothing,
        HAS_BIAS=bias is not None, BLOCK_N=_BLOCK_N, BLOCK_V=_BLOCK_V, BLOCK_H=_BLOCK_H,
        PRECISION=dot_precision(hidden.dtype),
    )  # fmt: skip
    return lse, row_loss


def _triton_backward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, lse: Tensor, scale: Tensor,
    ignore_index: int, smoothing: float,
) -> tuple[Tensor, Tensor, Tensor | None]:  # fmt: skip
    """fp32 gradients for hidden [N, H], weight [V, H] and bias [V]; `scale` is grad_output / n_valid."""
    n, h = hidden.shape
    v = weight.shape[0]
    grad_hidden = torch.zeros(n, h, device=hidden.device, dtype=torch.float32)
    grad_weight = torch.zeros(v, h, device=hidden.device, dtype=torch.float32)
    grad_bias = torch.zeros(v, device=hidden.device, dtype=torch.float32) if bias is not None else None
    grid = (triton.cdiv(n, _BLOCK_N), triton.cdiv(v, _BLOCK_V))
    _lce_backward_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, target, lse, scale, grad_hidden, grad_weight,
        grad_bias if grad_bias is not None else grad_hidden, n, v, h, hidden.stride(0), weight.stride(0),
        ignore_index, smoothing,
        HAS_BIAS=bias is not None, BIAS_GRAD=grad_bias is not None, BLOCK_N=_BLOCK_N, BLOCK_V=_BLOCK_V,
        BLOCK_H=_BLOCK_H, PRECISION=dot_precision(hidden.dtype),
    )  # fmt: skip
    return grad_hidden, grad_weight, grad_bias


def _default_chunk_size(n: int, v: int, h: int) -> int:
    """Rows per chunk so that a chunk's logits [C, V] are about as large as `hidden` [N, H] (Liger's rule)."""
    rows = -(-n // -(-v // h))
    return min(n, 1 << (rows - 1).bit_length())


def _torch_forward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, ignore_index: int, smoothing: float,
    chunk_size: int, needs_grad: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:  # fmt: skip
    """Loss and, where `needs_grad`, the gradients of the mean loss, chunk by chunk over the N rows."""
    n, v = hidden.shape[0], weight.shape[0]
    w = weight.float()
    b = bias.float() if bias is not None else None
    valid = target != ignore_index
    inv_valid = 1.0 / valid.sum().clamp(min=1).float()
    loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
    grad_hidden = (
        torch.empty(hidden.shape, device=hidden.device, dtype=torch.float32) if needs_grad[0] else None
    )
    grad_weight = torch.zeros(w.shape, device=w.device, dtype=torch.float32) if needs_grad[1] else None
    grad_bias = torch.zeros(v, device=w.device, dtype=torch.float32) if needs_grad[2] else None
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        h = hidden[rows].float()
        keep = valid[rows]
        safe_target = torch.where(keep, target[rows], 0).unsqueeze(1)
        logits = torch.addmm(b, h, w.T) if b is not None else h @ w.T
        lse = torch.logsumexp(logits, dim=1)
        row_loss = lse - (1.0 - smoothing) * logits.gather(1, safe_target).squeeze(1)
        if smoothing:
            row_loss -= smoothing / v * logits.sum(dim=1)
        loss += torch.where(keep, row_loss, 0.0).sum()
        if not any(needs_grad):
            continue
        grad = logits.sub_(lse.unsqueeze(1)).exp_()
        grad.scatter_add_(1, safe_target, torch.full_like(lse, smoothing - 1.0).unsqueeze(1))
        if smoothing:
            grad.sub_(smoothing / v)
        grad.mul_(keep.unsqueeze(1))
        if grad_hidden is not None:
            torch.mm(grad, w, out=grad_hidden[rows])
        if grad_weight is not None:
            grad_weight.addmm_(grad.T, h)
        if grad_bias is not None:
            grad_bias += grad.sum(dim=0)
    grads = [g.mul_(inv_valid) if g is not None else None for g in (grad_hidden, grad_weight, grad_bias)]
    return loss * inv_valid, *grads


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, target: Tensor, ignore_index: int,
        smoothing: float, chunk_size: int, use_triton: bool, needs_grad: tuple[bool, bool, bool],
    ) -> Tensor:  # fmt: skip
        ctx.use_triton = use_triton
        if use_triton:
            lse, row_loss = _triton_forward(hidden, weight, bias, target, ignore_index, smoothing)
            n_valid = (target != ignore_index).sum().clamp(min=1).float()
            ctx.save_for_backward(hidden, weight, bias, target, lse, n_valid)
            ctx.ignore_index, ctx.smoothing = ignore_index, smoothing
            return row_loss.sum() / n_valid
        loss, *grads = _torch_forward(
            hidden, weight, bias, target, ignore_index, smoothing, chunk_size, needs_grad
        )
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        ctx.save_for_backward(
            *(g.to(d) if g is not None else None for g, d in zip(grads, ctx.dtypes, strict=True))
        )
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.use_triton:
            hidden, weight, bias, target, lse, n_valid = ctx.saved_tensors
            scale = grad_output.float() / n_valid
            grads = _triton_backward(
                hidden, weight, bias, target, lse, scale, ctx.ignore_index, ctx.smoothing
            )
            dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
            grads = tuple(g.to(d) if g is not None else None for g, d in zip(grads, dtypes, strict=True))
        else:
            grads = ctx.saved_tensors
            if bool(grad_output != 1.0):
                grads = tuple(g * grad_output.to(g.dtype) if g is not None else None for g in grads)
        return (*grads, None, None, None, None, None, None)


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    label_smoothing: float = 0.0,
    *,
    backend: Backend = "auto",
) -> Tensor:
    """`F.cross_entropy(hidden @ weight.T + bias, target, ...)`, mean over non-ignored rows, fused.

    hidden [N, H], weight [V, H], bias [V] or None, target [N] int64 (`ignore_index` marks rows to skip).
    Returns a 0-dim fp32 loss; 0 (with zero gradients) when every target is ignored.
    `chunk_size`: rows per chunk on the PyTorch route (default: logits chunk about the size of hidden);
    the Triton route tiles at fixed block sizes and ignores it. `backend`: "auto" runs Triton on CUDA
    tensors when triton is installed and PyTorch otherwise; "triton" forces it (CPU tensors need
    TRITON_INTERPRET=1, for tests), "torch" forces the PyTorch route.
    Under ZeRO-3 / FSDP call it inside the forward of the module owning `weight` (see module docstring).
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, H] and weight [V, H] expected, got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if target.shape != hidden.shape[:1] or target.dtype != torch.long:
        raise ValueError(
            f"target must be int64 of shape [{hidden.shape[0]}], got {target.dtype} {tuple(target.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    checked = target[target != ignore_index]
    if checked.numel() and bool((checked < 0).any() | (checked >= weight.shape[0]).any()):
        raise ValueError(
            f"target values must lie in [0, {weight.shape[0]}) or equal ignore_index={ignore_index}"
        )
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
        raise TypeError(f"hidden, weight and bias must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
    on_triton = use_triton(backend, hidden)
    n, v, h = hidden.shape[0], weight.shape[0], hidden.shape[1]
    chunk_size = chunk_size or _default_chunk_size(max(n, 1), v, h)
    grad_on = torch.is_grad_enabled()
    needs_grad = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    with torch.autocast(device_type, enabled=False):
        return _LinearCrossEntropy.apply(
            hidden.contiguous(), weight.contiguous(), bias.contiguous() if bias is not None else None,
            target.contiguous(), ignore_index, float(label_smoothing), chunk_size, on_triton, needs_grad,
        )  # fmt: skip


def linear_cross_entropy_reference(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
) -> Tensor:
    """Naive fp32 computation with the full logits; 0 instead of NaN when every target is ignored."""
    logits = F.linear(hidden.float(), weight.float(), bias.float() if bias is not None else None)
    total = F.cross_entropy(
        logits, target, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="sum"
    )
    return total / (target != ignore_index).sum().clamp(min=1)
