"""CLIP's symmetric InfoNCE, tiled so memory grows with B instead of B x B.

The B x B similarity matrix of a 16k batch is 1 GB in fp32 and autograd keeps several copies. Following
Inf-CL (implemented from its description), the matrix is visited in [tile, tile] blocks: the forward keeps an
online log-sum-exp per row (image->text) and per column (text->image); the backward recomputes each block,
turns it into the logit gradient and adds its products into the embedding gradients. Only the row and
column log-sum-exps [B] survive between the passes.

Routes: Triton kernels on CUDA tensors (block gradients added atomically, so gradient bits are not
run-to-run deterministic on GPU); tiled PyTorch elsewhere. Similarities and gradients accumulate in fp32.

Distributed (open_clip's local loss, defined with the other contrastive losses in `vlp.platform.losses`):
with `gather=True` in a run with world size > 1 each rank scores its local images against all texts and its
local texts against all images (`vlp.platform.losses.gather_features`, with gradient), positives at
`rank * B_local + i`. The mean over ranks of these per-rank losses equals the single-process loss on the
concatenated batch, and because the gather's backward sums gradients over ranks, DDP's gradient average
yields the single-process gradients. All ranks must hold the same local batch size.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from vlp.platform.distributed.collectives import is_distributed, rank
from vlp.platform.kernels._triton import Backend, dot_precision, tl, triton, use_triton

_BLOCK_M, _BLOCK_K, _BLOCK_D = 64, 64, 64
_DEFAULT_TILE = 2048

if triton is not None:
    from vlp.platform.kernels._triton import add_tile_gradients, similarity_tile

    @triton.jit
    def _row_lse_kernel(
        x_ptr, y_ptr, scale_ptr, lse_ptr, M, K, D, stride_x, stride_y,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < M
        scale = tl.load(scale_ptr)
        run_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_mask = cols < K
            raw = similarity_tile(
                x_ptr, y_ptr, rows, cols, row_mask, col_mask, D, stride_x, stride_y,
                BLOCK_M, BLOCK_K, BLOCK_D, PRECISION,
            )  # fmt: skip
            logits = tl.where(col_mask[None, :], raw * scale, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(logits, axis=1))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
            run_max = new_max
        tl.store(lse_ptr + rows, run_max + tl.log(run_sum), mask=row_mask)

    @triton.jit
    def _infonce_backward_kernel(
        a_ptr, b_ptr, scale_ptr, row_lse_ptr, col_lse_ptr, grad_a_ptr, grad_b_ptr, grad_scale_ptr,
        M, K, D, stride_a, stride_b, row_weight, col_weight,
        HAS_COLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        row_mask = rows < M
        col_mask = cols < K
        scale = tl.load(scale_ptr)
        raw = similarity_tile(
            a_ptr, b_ptr, rows, cols, row_mask, col_mask, D, stride_a, stride_b,
            BLOCK_M, BLOCK_K, BLOCK_D, PRECISION,
        )  # fmt: skip
        # Softmax part of d(loss)/d(logits); the positives' -1 terms are added outside, in O(B D).
        row_lse = tl.load(row_lse_ptr + rows, mask=row_mask, other=0.0)
        grad = row_weight * tl.exp(raw * scale - row_lse[:, None])
        if HAS_COLS:
            col_lse = tl.load(col_lse_ptr + cols, mask=col_mask, other=0.0)
            grad += col_weight * tl.exp(raw * scale - col_lse[None, :])
        grad = tl.where(row_mask[:, None] & col_mask[None, :], grad, 0.0)
        tl.store(grad_scale_ptr + pid_m * tl.num_programs(1) + pid_k, tl.sum(grad * raw))
        grad *= scale
        add_tile_gradients(
            grad, a_ptr, b_ptr, grad_a_ptr, grad_b_ptr, rows, cols, row_mask, col_mask, D, stride_a, stride_b,
            BLOCK_D, PRECISION,
        )  # fmt: skip


def _triton_row_lse(x: Tensor, y: Tensor, scale: Tensor) -> Tensor:
    """log-sum-exp over K of scale * x [M, D] @ y[K, D].T, shape [M], fp32."""
    lse = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    _row_lse_kernel[(triton.cdiv(x.shape[0], _BLOCK_M),)](
        x, y, scale, lse, x.shape[0], y.shape[0], x.shape[1], x.stride(0), y.stride(0),
        BLOCK_M=_BLOCK_M, BLOCK_K=_BLOCK_K, BLOCK_D=_BLOCK_D, PRECISION=dot_precision(x.dtype),
    )  # fmt: skip
    return lse


def _triton_softmax_grads(
    a: Tensor, b: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor | None, row_w: float, col_w: float
) -> tuple[Tensor, Tensor, Tensor]:
    m, d = a.shape
    grad_a = torch.zeros(m, d, device=a.device, dtype=torch.float32)
    grad_b = torch.zeros(b.shape, device=a.device, dtype=torch.float32)
    grid = (triton.cdiv(m, _BLOCK_M), triton.cdiv(b.shape[0], _BLOCK_K))
    grad_scale = torch.empty(grid[0] * grid[1], device=a.device, dtype=torch.float32)
    _infonce_backward_kernel[grid](
        a, b, scale, row_lse, col_lse if col_lse is not None else row_lse, grad_a, grad_b, grad_scale,
        m, b.shape[0], d, a.stride(0), b.stride(0), row_w, col_w,
        HAS_COLS=col_lse is not None, BLOCK_M=_BLOCK_M, BLOCK_K=_BLOCK_K, BLOCK_D=_BLOCK_D,
        PRECISION=dot_precision(a.dtype),
    )  # fmt: skip
    return grad_a, grad_b, grad_scale.sum()


def _torch_lse(
    a: Tensor, b: Tensor, scale: Tensor, tile: int, with_cols: bool
) -> tuple[Tensor, Tensor | None]:
    """Row (and column) log-sum-exp of scale * a [M, D] @ b [K, D].T, merged tile by tile."""
    row_lse = torch.full((a.shape[0],), float("-inf"), device=a.device, dtype=torch.float32)
    col_lse = torch.full_like(b[:, 0], float("-inf"), dtype=torch.float32) if with_cols else None
    for i in range(0, a.shape[0], tile):
        for j in range(0, b.shape[0], tile):
            logits = (a[i : i + tile] @ b[j : j + tile].T).mul_(scale)
            row_lse[i : i + tile] = torch.logaddexp(row_lse[i : i + tile], torch.logsumexp(logits, dim=1))
            if col_lse is not None:
                col_lse[j : j + tile] = torch.logaddexp(col_lse[j : j + tile], torch.logsumexp(logits, dim=0))
    return row_lse, col_lse


def _torch_softmax_grads(
    a: Tensor, b: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor | None, row_w: float, col_w: float,
    tile: int,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    grad_a, grad_b = torch.zeros_like(a), torch.zeros_like(b)
    grad_scale = torch.zeros((), device=a.device, dtype=torch.float32)
    for i in range(0, a.shape[0], tile):
        for j in range(0, b.shape[0], tile):
            raw = a[i : i + tile] @ b[j : j + tile].T
            logits = raw * scale
            grad = (logits - row_lse[i : i + tile, None]).exp_().mul_(row_w)
            if col_lse is not None:
                grad += logits.sub_(col_lse[None, j : j + tile]).exp_().mul_(col_w)
            grad_scale += torch.vdot(grad.flatten(), raw.flatten())
            grad.mul_(scale)
            grad_a[i : i + tile].addmm_(grad, b[j : j + tile])
            grad_b[j : j + tile].addmm_(grad.T, a[i : i + tile])
    return grad_a, grad_b, grad_scale


class _InfoNCE(torch.autograd.Function):
    """Mean cross-entropy of the rows of scale * a [M, D] @ b [K, D].T with positives at column offset + i;
    with `symmetric` (M == K, offset 0) the mean of that and the column-wise cross-entropy."""

    @staticmethod
    def forward(
        ctx, a: Tensor, b: Tensor, scale: Tensor, offset: int, symmetric: bool, tile: int, use_triton: bool
    ) -> Tensor:
        m, k = a.shape[0], b.shape[0]
        row_w, col_w = (0.5 / m, 0.5 / k) if symmetric else (1.0 / m, 0.0)
        scale32 = scale.float()
        if use_triton:
            row_lse = _triton_row_lse(a, b, scale32)
            col_lse = _triton_row_lse(b, a, scale32) if symmetric else None
        else:
            row_lse, col_lse = _torch_lse(a.float(), b.float(), scale32, tile, symmetric)
        positive = (a.float() * b[offset : offset + m].float()).sum()
        loss = row_w * row_lse.sum() - (row_w + col_w) * scale32 * positive
        if col_lse is not None:
            loss = loss + col_w * col_lse.sum()
        ctx.save_for_backward(a, b, scale, row_lse, col_lse)
        ctx.offset, ctx.weights, ctx.tile, ctx.use_triton = offset, (row_w, col_w), tile, use_triton
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        a, b, scale, row_lse, col_lse = ctx.saved_tensors
        (row_w, col_w), offset = ctx.weights, ctx.offset
        scale32 = scale.float()
        if ctx.use_triton:
            grad_a, grad_b, grad_scale = _triton_softmax_grads(a, b, scale32, row_lse, col_lse, row_w, col_w)
        else:
            a32, b32 = a.float(), b.float()
            grad_a, grad_b, grad_scale = _torch_softmax_grads(
                a32, b32, scale32, row_lse, col_lse, row_w, col_w, ctx.tile
            )
        positives = b[offset : offset + a.shape[0]].float()
        grad_a -= (row_w + col_w) * scale32 * positives
        grad_b[offset : offset + a.shape[0]] -= (row_w + col_w) * scale32 * a.float()
        grad_scale = grad_scale - (row_w + col_w) * (a.float() * positives).sum()
        g = grad_output.float()
        return (
            (grad_a * g).to(a.dtype),
            (grad_b * g).to(b.dtype),
            (grad_scale * g).to(scale.dtype),
            None,
            None,
            None,
            None,
        )


def contrastive_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: Tensor,
    chunk_size: int | None = None,
    *,
    gather: bool = True,
    gathered: tuple[Tensor, Tensor] | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """CLIP's symmetric InfoNCE: mean of image->text and text->image cross-entropy, diagonal positives.

    image_emb, text_emb [B, D], already L2-normalised; logit_scale: 0-dim multiplier (already exp'ed),
    which receives a gradient. Returns a 0-dim fp32 loss. `chunk_size`: tile edge of the PyTorch route
    (default 2048); the Triton route tiles at fixed block sizes and ignores it. `gather`: in a
    distributed run, score local rows against embeddings gathered from all ranks (see module docstring).
    `gathered`: every rank's (image, text) embeddings [W * B, D] in rank order, already gathered with
    gradients (a joint step's one gather, `vlp.tasks.global_rows`), scored against instead of gathering.
    `backend`: "auto" (Triton on CUDA tensors when installed), "triton" (CPU tensors need
    TRITON_INTERPRET=1, for tests) or "torch".
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image_emb and text_emb must both be [B, D], got {tuple(image_emb.shape)}, {tuple(text_emb.shape)}"
        )
    if image_emb.shape[0] == 0:
        raise ValueError("contrastive_loss needs a batch of at least one pair, got B=0")
    if not isinstance(logit_scale, Tensor) or logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must be a one-element tensor, got {logit_scale!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    device_type = image_emb.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        image_emb, text_emb = image_emb.to(dtype), text_emb.to(dtype)
    if image_emb.dtype != text_emb.dtype or not image_emb.is_floating_point():
        raise TypeError(f"embeddings must share a floating dtype, got {image_emb.dtype} and {text_emb.dtype}")
    on_triton = use_triton(backend, image_emb)
    tile = chunk_size or _DEFAULT_TILE
    scale = logit_scale.reshape(())
    image_emb, text_emb = image_emb.contiguous(), text_emb.contiguous()
    with torch.autocast(device_type, enabled=False):
        if not (gather and is_distributed()):
            return _InfoNCE.apply(image_emb, text_emb, scale, 0, True, tile, on_triton)
        from vlp.platform.losses.gather import gather_features  # the losses' one gather (imports kernels)

        all_image, all_text = (
            t.to(image_emb.dtype).contiguous()
            for t in gather_features(image_emb, text_emb, gathered=gathered)
        )
        offset = rank() * image_emb.shape[0]
        image_to_text = _InfoNCE.apply(image_emb, all_text, scale, offset, False, tile, on_triton)
        text_to_image = _InfoNCE.apply(text_emb, all_image, scale, offset, False, tile, on_triton)
        return 0.5 * (image_to_text + text_to_image)


def contrastive_loss_reference(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor) -> Tensor:
    """Naive fp32 computation with the full [B, B] logits, single process."""
    logits = logit_scale.float() * image_emb.float() @ text_emb.float().T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
