"""contrastive_loss equals CLIP's naive symmetric InfoNCE in loss and in the gradients of both embeddings
and of the logit scale.

Both routes are compared with `contrastive_loss_reference` (fp32, full [B, B] logits). The Triton route runs
under TRITON_INTERPRET=1 in a subprocess (this file run as a script), so the variable is set before the
kernels are decorated and never reaches the main pytest process.

Tolerances (loss: absolute; gradients: per element |a - b| <= rtol * |b| + atol * max|b| + 1e-7):
  fp32  loss 1e-5, gradients rtol 1e-4, atol 1e-6
  fp16  loss 1e-4, gradients rtol 4e-3, atol 1e-3   (embedding gradients are returned in fp16)
  bf16  loss 1e-3, gradients rtol 2e-2, atol 1e-2   (PyTorch route only)
Interpreter limits: bf16 `tl.dot` is wrong and bf16 atomics are unsupported in the interpreter, so bf16
runs only through the PyTorch route on CPU; GPU-only behaviour (TF32 products, atomics under contention,
block-size performance) is untested here.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

from vlp.platform.kernels import contrastive_loss, contrastive_loss_reference
from vlp.platform.kernels.contrastive_loss import _InfoNCE

TOLERANCES = {
    torch.float32: (1e-5, 1e-4, 1e-6),
    torch.float16: (1e-4, 4e-3, 1e-3),
    torch.bfloat16: (1e-3, 2e-2, 1e-2),
}

CASES = {
    "fp32_odd_batch": dict(b=37, d=40, chunk_size=16),
    "fp32_batch_not_multiple_of_block": dict(b=130, d=72, chunk_size=50),
    "single_pair": dict(b=1, d=40),
    "fp16": dict(b=70, d=40, dtype=torch.float16, chunk_size=32),
}
TORCH_ONLY_CASES = {
    "bf16": dict(b=45, d=24, dtype=torch.bfloat16, chunk_size=16),
    "one_row_tiles": dict(b=9, d=8, chunk_size=1),
}


def _embeddings(b, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(b, d, generator=gen), dim=-1)
    text = F.normalize(torch.randn(b, d, generator=gen) + 0.5 * image, dim=-1)
    return image.to(dtype), text.to(dtype), torch.tensor(14.0)


def _assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(
        actual.float(), expected.float(), rtol=rtol, atol=atol * expected.float().abs().max().item() + 1e-7
    )


def _assert_matches_reference(backend, b, d, dtype=torch.float32, chunk_size=None):
    params = [t.requires_grad_() for t in _embeddings(b, d, dtype)]
    ref_params = [t.detach().clone().requires_grad_() for t in params]
    loss = contrastive_loss(*params, chunk_size=chunk_size, backend=backend)
    expected = contrastive_loss_reference(*ref_params)
    (1.5 * loss).backward()
    (1.5 * expected).backward()
    loss_atol, rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(loss, expected, atol=loss_atol, rtol=0)
    for p, ref in zip(params, ref_params, strict=True):
        _assert_grad_close(p.grad, ref.grad, rtol, atol)


def _assert_local_rows_match_reference(backend, m=20, k=50, offset=30, d=24):
    """One rank's image->text term: local rows against gathered columns, positives at offset + i."""
    gen = torch.Generator().manual_seed(1)
    a = F.normalize(torch.randn(m, d, generator=gen), dim=-1).requires_grad_()
    b = F.normalize(torch.randn(k, d, generator=gen), dim=-1).requires_grad_()
    scale = torch.tensor(9.0, requires_grad=True)
    ref = [t.detach().clone().requires_grad_() for t in (a, b, scale)]
    loss = _InfoNCE.apply(a, b, scale, offset, False, 16, backend == "triton")
    expected = F.cross_entropy(ref[2] * ref[0] @ ref[1].T, torch.arange(m) + offset)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
    for p, r in zip((a, b, scale), ref, strict=True):
        _assert_grad_close(p.grad, r.grad, 1e-4, 1e-6)


@pytest.mark.parametrize("case", [*CASES, *TORCH_ONLY_CASES])
def test_torch_route_matches_reference(case):
    _assert_matches_reference("torch", **{**CASES, **TORCH_ONLY_CASES}[case])


def test_torch_route_local_rows_against_gathered_columns_match_cross_entropy():
    _assert_local_rows_match_reference("torch")


def test_triton_route_matches_reference_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(CASES) + 1}/{len(CASES) + 1} triton cases match" in proc.stdout


def test_torch_route_saves_no_batch_by_batch_tensor():
    b, d = 512, 16
    params = [t.requires_grad_() for t in _embeddings(b, d)]
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        contrastive_loss(*params, chunk_size=64, backend="torch")
    assert max(saved) <= b * d
    assert sum(saved) < b * b // 10


def test_one_element_logit_scale_gets_a_gradient_of_its_shape():
    image, text, _ = _embeddings(8, 6)
    scale = torch.tensor([10.0], requires_grad=True)
    contrastive_loss(image, text, scale).backward()
    assert scale.grad.shape == (1,) and torch.isfinite(scale.grad).all()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(image_emb=torch.randn(4, 3, 2)), ValueError, "image_emb"),
        (dict(text_emb=torch.randn(5, 6)), ValueError, "text_emb"),
        (dict(image_emb=torch.randn(0, 6), text_emb=torch.randn(0, 6)), ValueError, "B=0"),
        (dict(logit_scale=torch.ones(2)), ValueError, "logit_scale"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(text_emb=torch.randn(4, 6, dtype=torch.float64)), TypeError, "dtype"),
    ],
)
def test_bad_input_raises_naming_the_argument(kwargs, error, match):
    args = dict(image_emb=torch.randn(4, 6), text_emb=torch.randn(4, 6), logit_scale=torch.tensor(10.0))
    with pytest.raises(error, match=match):
        contrastive_loss(**{**args, **kwargs})


if __name__ == "__main__":  # run by test_triton_route_matches_reference_under_interpreter
    for name, case in CASES.items():
        _assert_matches_reference("triton", **case)
        print(f"ok {name}")
    _assert_local_rows_match_reference("triton")
    print(f"{len(CASES) + 1}/{len(CASES) + 1} triton cases match")
