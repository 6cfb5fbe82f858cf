"""The contrastive losses, one home, with their distributed behaviour as explicit arguments (open_clip's
`loss.py`): InfoNCE (CLIP), InfoNCE with momentum soft targets and a queue (ALBEF), and the pairwise
sigmoid loss (SigLIP) with its ring exchange. The tiled kernels in `vlp.platform.kernels` are the fast route
each of them calls."""

from vlp.platform.losses.gather import gather_features
from vlp.platform.losses.infonce import distilled_infonce_loss, infonce_loss
from vlp.platform.losses.sigmoid import positive_pairs, sigmoid_loss

__all__ = ["distilled_infonce_loss", "gather_features", "infonce_loss", "positive_pairs", "sigmoid_loss"]
