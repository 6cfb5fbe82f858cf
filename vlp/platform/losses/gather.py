"""The one gather of the contrastive losses: every rank's rows, in rank order."""

from __future__ import annotations

from torch import Tensor

from vlp.platform.distributed.collectives import all_gather_many


def gather_features(
    image: Tensor, text: Tensor, *, with_grad: bool = True, gathered: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor]:
    """(image [W * B, E], text [W * B, E]) of every rank in rank order, in one collective. `with_grad`: the
    gather's backward sums each rank's gradient over ranks (open_clip's `gather_with_grad`), so a local loss
    per rank averaged by DDP gives the single-process gradient. `gathered`: the step's rows already gathered
    (a joint step's one gather, `vlp.tasks.global_rows`), returned as they are. Identity in one process."""
    if gathered is not None:
        return gathered
    all_image, all_text = all_gather_many([image, text], with_grad=with_grad)
    return all_image, all_text
