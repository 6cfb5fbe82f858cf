"""Box conversions, paired IoU / GIoU and the GIoU loss, safe at degenerate boxes.

torchvision.ops gives the format conversions and the all-pairs `box_iou` / `generalized_box_iou`
([N, M] matrices); grounding needs the elementwise pairs (prediction i against target i), written here.

Every ratio adds `eps` (default 1e-7, torchvision's GIoU-loss value) to its denominator, so zero-area
boxes give finite values and finite gradients: a zero-area box has IoU 0 with every box, itself included,
and two identical zero-area boxes have GIoU 0. For boxes of area `a` the eps shifts IoU by at most
`eps / a` relative. Widths and heights are clamped at 0, so an inverted box (x2 < x1) counts as empty
instead of giving a negative area. Half-precision inputs are computed in float32.
"""

import torch
from torch import Tensor
from torchvision.ops import box_convert

DEFAULT_EPS = 1e-7


def _check_boxes(name: str, boxes: Tensor) -> None:
    if not isinstance(boxes, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(boxes).__name__}")
    if boxes.ndim == 0 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [..., 4], got {tuple(boxes.shape)}")


def _check_pairs(a: Tensor, b: Tensor, names: tuple[str, str] = ("a", "b")) -> None:
    _check_boxes(names[0], a)
    _check_boxes(names[1], b)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must both have shape [N, 4], got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _as_float(boxes: Tensor) -> Tensor:
    return boxes if boxes.dtype in (torch.float32, torch.float64) else boxes.float()


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(cx, cy, w, h) -> (x1, y1, x2, y2); `[..., 4]` -> `[..., 4]`."""
    _check_boxes("boxes", boxes)
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(x1, y1, x2, y2) -> (cx, cy, w, h); `[..., 4]` -> `[..., 4]`."""
    _check_boxes("boxes", boxes)
    return box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")


def _area(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)


def _intersection_and_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    top_left = torch.maximum(a[:, :2], b[:, :2])
    bottom_right = torch.minimum(a[:, 2:], b[:, 2:])
    size = (bottom_right - top_left).clamp(min=0)
    intersection = size[:, 0] * size[:, 1]
    return intersection, _area(a) + _area(b) - intersection


def paired_box_iou(a: Tensor, b: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """IoU of `a[i]` with `b[i]`: xyxy `[N, 4]`, `[N, 4]` -> `[N]` (the diagonal of `box_iou(a, b)`)."""
    _check_pairs(a, b)
    a, b = _as_float(a), _as_float(b)
    intersection, union = _intersection_and_union(a, b)
    return intersection / (union + eps)


def paired_generalized_box_iou(a: Tensor, b: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """GIoU of `a[i]` with `b[i]` (Rezatofighi et al. 2019), in [-1, 1]: xyxy `[N, 4]`, `[N, 4]` -> `[N]`.

    GIoU = IoU - (enclosing area - union) / enclosing area; unlike IoU it still ranks (and gives
    gradients to) boxes that do not overlap.
    """
    _check_pairs(a, b)
    a, b = _as_float(a), _as_float(b)
    intersection, union = _intersection_and_union(a, b)
    enclosing = torch.cat([torch.minimum(a[:, :2], b[:, :2]), torch.maximum(a[:, 2:], b[:, 2:])], dim=1)
    enclosing_area = _area(enclosing)
    return intersection / (union + eps) - (enclosing_area - union) / (enclosing_area + eps)


def generalized_box_iou_loss(
    pred: Tensor, target: Tensor, reduction: str = "mean", eps: float = DEFAULT_EPS
) -> Tensor:
    """1 - GIoU per pair, xyxy `[N, 4]`, reduced by `reduction` ("mean" | "sum" | "none" -> `[N]`).

    "mean" of zero pairs is 0 (connected to the graph), so an empty batch does not produce NaN.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    _check_pairs(pred, target, names=("pred", "target"))
    loss = 1 - paired_generalized_box_iou(pred, target, eps=eps)
    if reduction == "none":
        return loss
    if reduction == "sum" or loss.numel() == 0:
        return loss.sum()
    return loss.mean()
