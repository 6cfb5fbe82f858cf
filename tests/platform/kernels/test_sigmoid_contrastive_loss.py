"""sigmoid_contrastive_loss equals SigLIP's naive loss (full [M, K] logits, -logsigmoid(z * logits)) in value
and in the gradients of both embeddings, the scale and the bias; tiled equals untiled; the PyTorch route keeps
no [M, K] tensor and allocates nothing larger than a tile or the embeddings.

The Triton route runs under TRITON_INTERPRET=1 in a subprocess (this file run as a script), as for the other
kernels. Tolerances: fp64 1e-10 (PyTorch route); fp32 loss 1e-5 relative, gradients rtol 1e-4 with atol
1e-6 of the largest element; fp16 inputs (Triton) 2e-3 / 4e-3.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.graph import saved_tensors_hooks
from torch.utils._python_dispatch import TorchDispatchMode

from vlp.platform.kernels import sigmoid_contrastive_loss, sigmoid_contrastive_loss_reference

CASES = {
    "fp32_odd_batch": dict(m=37, k=37, d=40, chunk_size=16),
    "fp32_not_multiple_of_block": dict(m=70, k=70, d=72, chunk_size=50),
    "negatives_only_rectangle": dict(m=20, k=33, d=24, positives="none"),
    "duplicates": dict(m=30, k=30, d=16, positives="duplicates", chunk_size=7),
    "fp16": dict(m=40, k=40, d=32, dtype=torch.float16),
}
TOLERANCES = {
    torch.float64: (1e-10, 1e-10, 1e-10),
    torch.float32: (1e-5, 1e-4, 1e-6),
    torch.float16: (2e-3, 4e-3, 4e-3),
}


def _inputs(m, k, d, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(m, d, generator=gen, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(k, d, generator=gen, dtype=torch.float64), dim=-1)
    text[: min(m, k)] += image[: min(m, k)]  # pairs are similar: both signs of the logits are exercised
    text = F.normalize(text, dim=-1)
    params = torch.float64 if dtype == torch.float64 else torch.float32
    return image.to(dtype), text.to(dtype), torch.tensor(10.0, dtype=params), torch.tensor(-4.0, dtype=params)


def _positives(kind, m, k):
    """(index pairs for the kernel, the same as an [M, K] mask for the reference)."""
    if kind == "none":
        mask = torch.zeros(m, k, dtype=torch.bool)
    elif kind == "duplicates":
        mask = torch.eye(m, k, dtype=torch.bool)
        mask[3, 5] = mask[5, 3] = mask[0, k - 1] = True
    else:
        return None, None
    return mask.nonzero(), mask


def _loss_and_grads(fn, image, text, scale, bias):
    leaves = [t.clone().requires_grad_() for t in (image, text, scale, bias)]
    loss = fn(*leaves)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


def _assert_matches_reference(backend, m, k, d, dtype=torch.float32, chunk_size=None, positives=None):
    image, text, scale, bias = _inputs(m, k, d, dtype)
    pairs, mask = _positives(positives, m, k)
    got = _loss_and_grads(
        lambda *a: sigmoid_contrastive_loss(*a, chunk_size, positives=pairs, backend=backend),
        image, text, scale, bias,
    )  # fmt: skip
    want = _loss_and_grads(
        lambda i, t, s, b: sigmoid_contrastive_loss_reference(
            i.to(torch.float64), t.to(torch.float64), s.to(torch.float64), b.to(torch.float64), mask
        ),
        image, text, scale, bias,
    )  # fmt: skip
    loss_tol, rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(got[0].double(), want[0], rtol=loss_tol, atol=loss_tol)
    for g, w in zip(got[1:], want[1:], strict=True):
        assert g.dtype == w.dtype if dtype == torch.float64 else g.shape == w.shape
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol * w.abs().max().item() + 1e-7)


@pytest.mark.parametrize("case", [c for c in CASES if c != "fp16"])
def test_torch_route_matches_reference(case):
    _assert_matches_reference("torch", **CASES[case])


def test_fp64_matches_reference_exactly():
    _assert_matches_reference(
        "torch", m=13, k=13, d=9, dtype=torch.float64, chunk_size=4, positives="duplicates"
    )


def test_tiled_equals_untiled():
    image, text, scale, bias = _inputs(50, 50, 12)
    tiled = _loss_and_grads(
        lambda *a: sigmoid_contrastive_loss(*a, chunk_size=8, backend="torch"), image, text, scale, bias
    )
    untiled = _loss_and_grads(
        lambda *a: sigmoid_contrastive_loss(*a, chunk_size=50, backend="torch"), image, text, scale, bias
    )
    for t, u in zip(tiled, untiled, strict=True):
        torch.testing.assert_close(t, u, rtol=1e-5, atol=1e-6)


class _LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_stays_at_a_tile_and_the_embeddings():
    b, d, chunk = 512, 16, 64
    image, text, scale, bias = (t.requires_grad_() for t in _inputs(b, b, d))
    saved = []
    with _LargestTensor() as probe, saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        sigmoid_contrastive_loss(image, text, scale, bias, chunk_size=chunk, backend="torch").backward()
    assert max(saved) <= b * d
    assert probe.largest <= max(chunk * chunk, b * d)  # the full logits would be b * b = 262144


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(image=torch.randn(4, 3, 2)), ValueError, "image and text"),
        (dict(text=torch.randn(5, 7)), ValueError, "image and text"),
        (dict(text=torch.randn(5, 6)), ValueError, "diagonal"),
        (dict(image=torch.randn(0, 6)), ValueError, "empty"),
        (dict(scale=torch.ones(2)), ValueError, "scale"),
        (dict(bias=1.0), ValueError, "bias"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(positives=torch.zeros(3, dtype=torch.long)), ValueError, "positives"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(text=torch.randn(4, 6, dtype=torch.float64)), TypeError, "dtype"),
    ],
)
def test_bad_input_raises_naming_the_argument(kwargs, error, match):
    args = dict(
        image=torch.randn(4, 6), text=torch.randn(4, 6), scale=torch.tensor(10.0), bias=torch.tensor(-10.0)
    )
    with pytest.raises(error, match=match):
        sigmoid_contrastive_loss(**{**args, **kwargs})


def test_triton_route_matches_reference_under_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(CASES)}/{len(CASES)} triton cases match" in proc.stdout


if __name__ == "__main__":  # run by test_triton_route_matches_reference_under_interpreter
    for name, case in CASES.items():
        _assert_matches_reference("triton", **case)
        print(f"ok {name}")
    print(f"{len(CASES)}/{len(CASES)} triton cases match")
