import pytest
import torch
from torchvision.ops import box_iou, generalized_box_iou
from torchvision.ops import generalized_box_iou_loss as tv_generalized_box_iou_loss

from vlp.platform.boxes import (
    box_cxcywh_to_xyxy,
    box_xyxy_to_cxcywh,
    generalized_box_iou_loss,
    paired_box_iou,
    paired_generalized_box_iou,
)

# (a, b, IoU, GIoU) in xyxy, arithmetic written out.
HAND_CASES = [
    # overlap: inter 1*1 = 1, union 4 + 4 - 1 = 7, enclosing 3*3 = 9; GIoU = 1/7 - (9-7)/9 = -5/63
    ([0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0], 1 / 7, -5 / 63),
    # identical 2x3 boxes: inter = union = enclosing = 6
    ([0.0, 0.0, 2.0, 3.0], [0.0, 0.0, 2.0, 3.0], 1.0, 1.0),
    # inside: inter 1, union 16 + 1 - 1 = 16, enclosing 16; GIoU = 1/16 - 0
    ([0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 2.0, 2.0], 1 / 16, 1 / 16),
    # touching, not overlapping: inter 0, union 2, enclosing 3*1 = 3; GIoU = 0 - (3-2)/3
    ([0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0], 0.0, -1 / 3),
    # far apart: union 2, enclosing 4*4 = 16; GIoU = -(16-2)/16 = -7/8
    ([0.0, 0.0, 1.0, 1.0], [3.0, 3.0, 4.0, 4.0], 0.0, -7 / 8),
    # zero-width segment inside a 2x2 box: inter 0, union 0 + 4 = 4, enclosing [0,0,2,3] = 6; GIoU = -(6-4)/6
    ([1.0, 1.0, 1.0, 3.0], [0.0, 0.0, 2.0, 2.0], 0.0, -1 / 3),
    # the same point twice: union 0 and enclosing 0, both ratios are 0 / eps = 0
    ([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], 0.0, 0.0),
]


def _hand_tensors(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.tensor([case[0] for case in HAND_CASES], dtype=dtype)
    b = torch.tensor([case[1] for case in HAND_CASES], dtype=dtype)
    return a, b


def _random_xyxy(n: int, generator: torch.Generator, scale: float = 100.0) -> torch.Tensor:
    corner = torch.rand(n, 2, generator=generator, dtype=torch.float64) * scale
    size = torch.rand(n, 2, generator=generator, dtype=torch.float64) * scale + 1.0
    return torch.cat([corner, corner + size], dim=1)


def test_paired_iou_and_giou_match_hand_computed_cases():
    a, b = _hand_tensors()
    expected_iou = torch.tensor([case[2] for case in HAND_CASES], dtype=torch.float64)
    expected_giou = torch.tensor([case[3] for case in HAND_CASES], dtype=torch.float64)
    torch.testing.assert_close(paired_box_iou(a, b), expected_iou, atol=1e-7, rtol=0)
    torch.testing.assert_close(paired_generalized_box_iou(a, b), expected_giou, atol=1e-7, rtol=0)
    torch.testing.assert_close(paired_box_iou(b, a), expected_iou, atol=1e-7, rtol=0)


def test_giou_loss_is_one_minus_giou_with_reductions():
    a, b = _hand_tensors()
    giou = paired_generalized_box_iou(a, b)
    torch.testing.assert_close(generalized_box_iou_loss(a, b, reduction="none"), 1 - giou)
    torch.testing.assert_close(generalized_box_iou_loss(a, b, reduction="sum"), (1 - giou).sum())
    torch.testing.assert_close(generalized_box_iou_loss(a, b), (1 - giou).mean())


def test_giou_loss_of_empty_batch_is_zero_not_nan():
    empty = torch.zeros(0, 4, requires_grad=True)
    loss = generalized_box_iou_loss(empty, torch.zeros(0, 4))
    loss.backward()
    assert loss.item() == 0.0
    assert empty.grad is not None and empty.grad.shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_are_finite_at_degenerate_boxes(dtype):
    a, b = _hand_tensors(dtype)
    a.requires_grad_(True)
    b.requires_grad_(True)
    for value in (
        paired_box_iou(a, b).sum(),
        paired_generalized_box_iou(a, b).sum(),
        generalized_box_iou_loss(a, b),
    ):
        grad_a, grad_b = torch.autograd.grad(value, (a, b))
        assert torch.isfinite(value)
        assert torch.isfinite(grad_a).all() and torch.isfinite(grad_b).all()


def test_gradients_are_finite_for_cxcywh_predictions_with_zero_size():
    pred = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.2, 0.3, 0.0, 0.4]], requires_grad=True)
    target = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.6, 0.6, 0.2, 0.2]])
    loss = generalized_box_iou_loss(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(target))
    (grad,) = torch.autograd.grad(loss, pred)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_inverted_box_counts_as_empty():
    inverted = torch.tensor([[2.0, 2.0, 0.0, 0.0]])
    box = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    # inter 0, union 0 + 4 = 4, enclosing 4: IoU 0, GIoU 0 - 0/4 = 0
    assert paired_box_iou(inverted, box).item() == 0.0
    assert paired_generalized_box_iou(inverted, box).item() == pytest.approx(0.0, abs=1e-7)


def test_paired_results_equal_diagonal_of_torchvision_matrices():
    generator = torch.Generator().manual_seed(0)
    a, b = _random_xyxy(64, generator), _random_xyxy(64, generator)
    torch.testing.assert_close(paired_box_iou(a, b), box_iou(a, b).diagonal(), atol=1e-9, rtol=0)
    torch.testing.assert_close(
        paired_generalized_box_iou(a, b), generalized_box_iou(a, b).diagonal(), atol=1e-9, rtol=0
    )
    torch.testing.assert_close(
        generalized_box_iou_loss(a, b, reduction="none"),
        tv_generalized_box_iou_loss(a, b),
        atol=1e-12,
        rtol=0,
    )


def test_giou_gradients_match_finite_differences():
    generator = torch.Generator().manual_seed(1)
    a = _random_xyxy(6, generator).requires_grad_(True)
    b = _random_xyxy(6, generator).requires_grad_(True)
    assert torch.autograd.gradcheck(paired_generalized_box_iou, (a, b))


def test_half_precision_is_computed_in_float32():
    a, b = _hand_tensors(torch.float16)
    assert paired_box_iou(a, b).dtype == torch.float32
    assert paired_generalized_box_iou(a, b).dtype == torch.float32


def test_conversions_match_hand_values_and_round_trip():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.9, 0.0, 0.0]])
    # x1 = cx - w/2, y1 = cy - h/2, x2 = cx + w/2, y2 = cy + h/2
    xyxy = torch.tensor([[0.4, 0.3, 0.6, 0.7], [0.1, 0.9, 0.1, 0.9]])
    torch.testing.assert_close(box_cxcywh_to_xyxy(cxcywh), xyxy)
    torch.testing.assert_close(box_xyxy_to_cxcywh(xyxy), cxcywh)
    batched = torch.rand(3, 5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(batched)), batched)
    torch.testing.assert_close(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(batched)), batched)


def test_bad_shapes_and_reduction_raise():
    with pytest.raises(ValueError, match="boxes must have shape"):
        box_cxcywh_to_xyxy(torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"a and b must both have shape \[N, 4\]"):
        paired_box_iou(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="pred and target"):
        generalized_box_iou_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="reduction must be"):
        generalized_box_iou_loss(torch.zeros(2, 4), torch.zeros(2, 4), reduction="max")
    with pytest.raises(TypeError, match="a must be a torch.Tensor"):
        paired_box_iou([[0, 0, 1, 1]], torch.zeros(1, 4))
