"""linear_cross_entropy equals the naive logits + F.cross_entropy in loss and in every gradient.

Both routes are compared with `linear_cross_entropy_reference` (fp32, full logits) on the same cases. The
Triton route runs under TRITON_INTERPRET=1 in a subprocess (this file run as a script), because the variable
must be set before the kernels are decorated and must not leak into the main pytest process.

Tolerances (loss: absolute; gradients: per element |a - b| <= rtol * |b| + atol * max|b| + 1e-7):
  fp32  loss 1e-5, gradients rtol 1e-4, atol 1e-6
  fp16  loss 1e-4, gradients rtol 4e-3, atol 1e-3   (gradients are returned in fp16; the PyTorch route
                                                     rounds once more when grad_output != 1)
  bf16  loss 1e-3, gradients rtol 2e-2, atol 1e-2   (PyTorch route only)
Interpreter limits: bf16 `tl.dot` is wrong and bf16 atomics are unsupported in the interpreter, so bf16
runs only through the PyTorch route on CPU; the Triton bf16 path is untested here, as is anything GPU-only
(TF32 products, atomics under contention, real block-size performance).
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks

from vlp.platform.kernels import linear_cross_entropy, linear_cross_entropy_reference
from vlp.platform.kernels.linear_cross_entropy import triton

TOLERANCES = {
    torch.float32: (1e-5, 1e-4, 1e-6),
    torch.float16: (1e-4, 4e-3, 1e-3),
    torch.bfloat16: (1e-3, 2e-2, 1e-2),
}

CASES = {
    "fp32": dict(n=37, v=1023, h=80),
    "fp32_two_row_blocks_smoothing": dict(n=130, v=300, h=40, smoothing=0.1),
    "single_row_no_bias": dict(n=1, v=1023, h=80, bias=False, ignored=0.0),
    "all_targets_ignored": dict(n=16, v=50, h=20, ignored=1.0),
    "fp16_smoothing": dict(n=37, v=1023, h=80, dtype=torch.float16, smoothing=0.1),
}
TORCH_ONLY_CASES = {
    "bf16": dict(n=37, v=1023, h=80, dtype=torch.bfloat16),
    "small_chunks": dict(n=50, v=97, h=24, chunk_size=7, smoothing=0.2),
}


def _inputs(n, v, h, dtype=torch.float32, bias=True, ignored=0.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype)
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype)
    b = torch.randn(v, generator=gen).to(dtype) if bias else None
    target = torch.randint(0, v, (n,), generator=gen)
    target[torch.rand(n, generator=gen) < ignored] = -100
    return hidden, weight, b, target


def _assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    assert actual.dtype == expected.dtype
    torch.testing.assert_close(
        actual.float(), expected.float(), rtol=rtol, atol=atol * expected.float().abs().max().item() + 1e-7
    )


def _assert_matches_reference(backend, dtype=torch.float32, smoothing=0.0, chunk_size=None, **shape):
    hidden, weight, bias, target = _inputs(dtype=dtype, **shape)
    params = [t.requires_grad_() for t in (hidden, weight, bias) if t is not None]
    ref_params = [t.detach().clone().requires_grad_() for t in params]
    ref_bias = ref_params[2] if bias is not None else None
    loss = linear_cross_entropy(
        hidden, weight, target, bias, label_smoothing=smoothing, chunk_size=chunk_size, backend=backend
    )
    expected = linear_cross_entropy_reference(*ref_params[:2], target, ref_bias, label_smoothing=smoothing)
    (1.5 * loss).backward()
    (1.5 * expected).backward()
    loss_atol, rtol, atol = TOLERANCES[dtype]
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected, atol=loss_atol, rtol=0)
    for p, ref in zip(params, ref_params, strict=True):
        _assert_grad_close(p.grad, ref.grad, rtol, atol)


@pytest.mark.parametrize("case", [*CASES, *TORCH_ONLY_CASES])
def test_torch_route_matches_reference(case):
    _assert_matches_reference("torch", **{**CASES, **TORCH_ONLY_CASES}[case])


def test_triton_route_matches_reference_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(CASES)}/{len(CASES)} triton cases match" in proc.stdout


def test_all_ignored_gives_zero_loss_and_zero_grads():
    hidden, weight, bias, _ = _inputs(8, 30, 12)
    params = [t.requires_grad_() for t in (hidden, weight, bias)]
    loss = linear_cross_entropy(hidden, weight, torch.full((8,), -1), bias, ignore_index=-1)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)


def test_reference_equals_f_cross_entropy_mean_with_smoothing_and_ignored_rows():
    hidden, weight, bias, target = _inputs(40, 17, 8, ignored=0.3)
    logits = hidden @ weight.T + bias
    expected = F.cross_entropy(logits, target, label_smoothing=0.15)
    reference = linear_cross_entropy_reference(hidden, weight, target, bias, label_smoothing=0.15)
    torch.testing.assert_close(reference, expected)


def test_torch_route_saves_only_gradients_not_logits():
    n, v, h = 256, 2000, 16
    hidden, weight, bias, target = _inputs(n, v, h)
    params = [t.requires_grad_() for t in (hidden, weight, bias)]
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        linear_cross_entropy(hidden, weight, target, bias, backend="torch")
    assert sum(saved) == sum(p.numel() for p in params) < n * v // 10


def test_no_grad_forward_returns_the_loss():
    hidden, weight, bias, target = _inputs(20, 40, 8)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, target, bias, backend="torch")
    torch.testing.assert_close(loss, linear_cross_entropy_reference(hidden, weight, target, bias))


def test_autocast_casts_inputs_and_keeps_fp32_weight_grad():
    hidden, weight, bias, target = _inputs(24, 50, 16)
    weight.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, target, bias)
    loss.backward()
    expected = linear_cross_entropy_reference(hidden.bfloat16(), weight.bfloat16(), target, bias.bfloat16())
    torch.testing.assert_close(loss, expected, atol=1e-3, rtol=0)
    assert weight.grad.dtype == torch.float32


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(hidden=torch.randn(4, 3, 2)), ValueError, "hidden"),
        (dict(weight=torch.randn(10, 7)), ValueError, "weight"),
        (dict(target=torch.zeros(4, dtype=torch.int32)), ValueError, "target"),
        (dict(target=torch.tensor([0, 1, 10, -100])), ValueError, "target values"),
        (dict(bias=torch.randn(9)), ValueError, "bias"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(weight=torch.randn(10, 6, dtype=torch.float64)), TypeError, "dtype"),
    ],
)
def test_bad_input_raises_naming_the_argument(kwargs, error, match):
    args = dict(hidden=torch.randn(4, 6), weight=torch.randn(10, 6), target=torch.tensor([0, 1, 9, -100]))
    with pytest.raises(error, match=match):
        linear_cross_entropy(**{**args, **kwargs})


def test_forcing_triton_on_cpu_without_interpreter_raises():
    error = RuntimeError if triton is None else ValueError
    with pytest.raises(error, match="backend='triton'"):
        linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([0, 1]), backend="triton")


def test_package_imports_and_runs_without_triton():
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, pytest\n"
        "from vlp.platform.kernels import contrastive_loss, linear_cross_entropy\n"
        "h, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 4, 2])\n"
        "assert torch.isfinite(linear_cross_entropy(h, w, t))\n"
        "e = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)\n"
        "assert torch.isfinite(contrastive_loss(e, e, torch.tensor(10.0)))\n"
        "with pytest.raises(RuntimeError, match='needs the `triton` package'):\n"
        "    linear_cross_entropy(h, w, t, backend='triton')\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


if __name__ == "__main__":  # run by test_triton_route_matches_reference_under_interpreter
    for name, case in CASES.items():
        _assert_matches_reference("triton", **case)
        print(f"ok {name}")
    print(f"{len(CASES)}/{len(CASES)} triton cases match")
