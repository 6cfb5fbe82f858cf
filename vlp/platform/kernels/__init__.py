"""Memory-saving loss kernels: Triton on CUDA tensors, a recomputing PyTorch route elsewhere.

Each file holds one kernel: its Triton kernels (optional; the package imports without triton), its
autograd Function, its public function and the naive PyTorch reference the tests compare against.
"""

from vlp.platform.kernels.contrastive_loss import contrastive_loss, contrastive_loss_reference
from vlp.platform.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from vlp.platform.kernels.sigmoid_contrastive_loss import (
    sigmoid_contrastive_loss,
    sigmoid_contrastive_loss_reference,
)

__all__ = [
    "contrastive_loss",
    "contrastive_loss_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "sigmoid_contrastive_loss",
    "sigmoid_contrastive_loss_reference",
]
