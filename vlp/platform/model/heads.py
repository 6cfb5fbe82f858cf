"""The task heads on the fused [CLS]: one MLP shape that VQA's answer classifier and grounding's box
regressor share."""

from __future__ import annotations

from torch import Tensor, nn


class MLPHead(nn.Module):
    """Fused [CLS] [B, D] -> [B, out]: Linear(D, 2D), LayerNorm, GELU, Linear(2D, out) (ViLT's VQA classifier,
    X-VLM's box MLP). Its parameters are `mlp.{0,1,3}.*` in every head built on it."""

    def __init__(self, width: int, out: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.LayerNorm(2 * width), nn.GELU(), nn.Linear(2 * width, out)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)
