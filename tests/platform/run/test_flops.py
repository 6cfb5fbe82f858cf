import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from vlp.platform.run.flops import count_flops, flop_counter

B, H, N, D = 2, 3, 7, 4
FORWARD = 4 * B * H * N * N * D  # q @ k^T and scores @ v, 2 FLOPs per multiply-add
BACKWARD = 10 * B * H * N * N * D  # score recompute + four gradient matmuls (torch's SDPA formula)


def qkv(requires_grad: bool = False) -> list[torch.Tensor]:
    return [torch.randn(B, H, N, D, requires_grad=requires_grad) for _ in range(3)]


MASKS = {
    "none": None,
    "additive": torch.randn(B, 1, 1, N),
    "bool": torch.rand(N, N) > 0.3,
    "full": torch.randn(B, H, N, N),
}


def test_plain_flop_counter_mode_misses_cpu_attention():
    q, k, v = qkv()
    with FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(q, k, v)
    assert plain.get_total_flops() == 0


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
def test_forward_attention_flops_are_exact(mask):
    q, k, v = qkv()
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)) == FORWARD


@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
def test_backward_attention_flops_are_counted(mask):
    q, k, v = qkv(requires_grad=True)
    total = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), backward=True)
    assert total == FORWARD + BACKWARD
    assert q.grad is not None


def test_math_fallback_counts_its_matmuls():
    # A mask that needs a gradient sends SDPA down the math path: two bmm forward, four backward.
    q, k, v = qkv(requires_grad=True)
    mask = torch.zeros(B, 1, 1, N, requires_grad=True)
    total = count_flops(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), backward=True)
    assert total == FORWARD + 2 * FORWARD


def test_context_manager_counts_linear_and_attention_together():
    layer = torch.nn.Linear(D, D, bias=True)
    q, k, v = qkv()
    with flop_counter() as counter:
        F.scaled_dot_product_attention(layer(q), k, v)
    assert counter.get_total_flops() == 2 * B * H * N * D * D + FORWARD


def test_backward_needs_a_tensor_output():
    with pytest.raises(TypeError, match="return a Tensor"):
        count_flops(lambda: (torch.ones(1),), backward=True)
